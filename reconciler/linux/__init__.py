

# The search path a process gets when nobody gives it one (Docker's and runc's default, the FHS order).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
