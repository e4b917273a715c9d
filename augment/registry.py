"""The names of augment's interchangeable parts, and where each lives: a leaf module (it imports nothing), so the
config can offer the names as choices without importing the parts, and a part's module can import the config
without a cycle.

Backends: name -> "module:Class", imported on first use (augment.backends.create), so `augment --help` and config
validation stay torch-free.
"""

BACKENDS: dict[str, str] = {
    "pixel": "augment.backends.pixel_unet:PixelBackend",
    "stable_diffusion": "augment.backends.stable_diffusion:StableDiffusionBackend",
}
