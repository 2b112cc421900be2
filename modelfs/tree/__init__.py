"""The tree a mount shows: the namespace of directories and files (lazily listed from the store or a
manifest), the listings that fill it, and the open files with the version each handle pinned."""
