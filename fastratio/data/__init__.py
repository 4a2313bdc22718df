"""Training data: published formats (``formats``), the order a run reads them in (``order``), and the
two sources a task draws batches from (``memory``: the whole set on the device; ``stream``: worker
processes reading from disk)."""
