"""Exceptions raised by DreamCache. Each message names the value at fault and the fix."""


class DreamCacheError(Exception):
    """Base class of every error this pack raises on purpose."""


class DreamCacheMismatchError(DreamCacheError, ValueError):
    """A cache, an adapter or an input does not fit the model or the other inputs."""


class DreamCacheInputError(DreamCacheError, ValueError):
    """A node input or argument has an invalid value, such as a file name that could leave its folder."""


class DreamCacheFileError(DreamCacheError, ValueError):
    """A file is missing, truncated, corrupt or not in the expected format."""
