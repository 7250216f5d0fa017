"""Tests run tiny models: one intra-op thread avoids oversubscription (5x faster on a busy 2-core box)."""

import torch

torch.set_num_threads(1)
