"""Container networking: CNI network configurations and plugins (cni), the network namespaces that
outlive the agent (netns), and the /etc files a container with its own network is given (etc_files).
They know nothing of containers; the network/cni isolator puts them together."""
