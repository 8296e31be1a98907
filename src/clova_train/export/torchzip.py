"""torch.save files read without torch.load: the reader lives in training (resume reads rank files too); export's name for it."""

from clova_train.training.torchzip import OnDisk, TorchZip, _LazyUnpickler, _zero_stage  # noqa: F401
