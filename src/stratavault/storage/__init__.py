"""Storage backends and wrappers: flat stores of named immutable objects."""

from stratavault.storage._base import ObjectInfo, Storage, StorageProperties, check_name

__all__ = ["ObjectInfo", "Storage", "StorageProperties", "check_name"]
