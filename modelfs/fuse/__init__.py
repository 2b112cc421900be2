"""The FUSE boundary: pyfuse3's `Operations`, translating each request to the core and its errors to errno,
and the extended attributes a mount answers. Nothing below this package imports pyfuse3's request types."""
