"""Each tower's weights read when the tower is first used.

A one-image classify whose label embeddings are on disk never runs the text tower, and a text search
never runs the image tower: reading and arranging a tower it does not use cost such a call a third or
more of its time (ViT-B/32: 250 MB of text weights, 350 MB of image weights). `load()` checks every key
and shape of the checkpoint at once, as before, and reads only what belongs to neither tower
(logit_scale); a tower's weights are read, and arranged for the kernel set, the first time the runner
runs that tower, or when `CLIP.model` is asked for (a user then holds the whole model). A kernel set
that keeps its arranged weights on disk (the int8 set's quantised weights) keys them on the checkpoint's
fingerprint and the tower (`keep`: the caches are on).
"""
from __future__ import annotations

from tinygrad.nn.state import get_state_dict

from . import _tinygrad, identity, trace
from .model import TOWERS, tower_of


class Towers:
    """Which towers of `model` still wait for their weights, and reading them (thread-safe)."""

    def __init__(self, checkpoint, model, dtype, backend, keep: bool = True):
        self.checkpoint, self.model, self.dtype, self.backend, self.keep = checkpoint, model, dtype, backend, keep
        self.pending = set(TOWERS)

    def load_shared(self) -> None:
        """Check every key and shape, and read the parameters of neither tower."""
        with _tinygrad.LOCK, self.backend.context():
            self.checkpoint.load_weights(self.model, self.dtype, self.backend.device,
                                         only=lambda k: tower_of(k) is None, checked=lambda k: True)

    def load(self, tower: str) -> None:
        """Read `tower`'s weights and arrange them for the kernel set, unless done already. A failure
        leaves the tower waiting: the next use reads it again."""
        if tower not in self.pending:
            return
        with _tinygrad.LOCK, self.backend.context():
            if tower not in self.pending:    # another thread read it while this one waited
                return
            with trace.phase(f"weights of the {tower} tower"):
                self.checkpoint.load_weights(self.model, self.dtype, self.backend.device,
                                             only=lambda k: tower_of(k) == tower)
            with trace.phase(f"{tower} tower's weights arranged for the kernels"), \
                    self.model.kernels.preparing(self._source(tower) if self.keep else None), \
                    self.model.kernels.handing_over(_sole_buffers(self.model, tower)):
                self.model.prepare(tower)
            self.pending.discard(tower)

    def _source(self, tower: str):
        """What identifies `tower`'s weights, for a kernel set that keeps them arranged on disk: computed only
        by such a set (the fingerprint hashes the weight files once; identity.py keeps the digests)."""
        c = self.checkpoint
        return lambda: {"fingerprint": identity.fingerprint(c.folder, c.weight_files(), c.config_file.name),
                        "tower": tower}

    def load_all(self) -> None:
        for tower in TOWERS:
            self.load(tower)


def _sole_buffers(model, tower: str) -> set:
    """The buffers of `tower`'s parameters that one parameter alone holds: just read (load_weights makes a
    buffer per parameter), so the kernel set may rearrange them in place (KernelSet.handing_over)."""
    held: dict = {}
    for key, t in get_state_dict(model).items():
        held.setdefault(_tinygrad.buffer_of(t), []).append(key)
    return {base for base, keys in held.items() if len(keys) == 1 and tower_of(keys[0]) == tower}
