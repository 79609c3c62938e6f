"""reconciler: a node agent that converges YAML manifests of Mesos ContainerInfo into Linux containers."""

__version__ = "0.1.0"
