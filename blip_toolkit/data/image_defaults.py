"""Image input defaults shared by the library and the CLI's help (no heavy imports here)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# 8192 x 8192. PIL's own guard (89M px) only warns; ours refuses before decoding.
DEFAULT_MAX_PIXELS = 1 << 26
