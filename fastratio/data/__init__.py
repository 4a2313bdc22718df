"""Training data: published formats (``formats``), the order a run reads them in (``order``), the
two sources an image task draws batches from (``memory``: the whole set on the device; ``stream``:
worker processes reading from disk), and ``captions``: prompt files and WebDataset image-caption or
latent-caption shards for text-to-image tasks, streamed the same way."""
