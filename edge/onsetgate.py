"""A cheap onset check on the audio thread, so a batching pipeline still reports starts at once.

With `audio.process_interval_s` the pipeline sleeps between runs and the audio thread does not
wake it for every block: that halves the agent's CPU. A sound starting during such a pause
would wait for the pause to end before the detector sees it. The gate looks at each block as it
arrives (one dot product, a few microseconds) and says when it is clearly louder than the quiet
background just before: then the audio thread wakes the pipeline at once.

The gate only decides when the detector runs, never what it finds: the detector still sees every
sample in order. A sound the gate does not notice (a narrow-band call inside loud broadband
noise, a slow fade-in) is found all the same, at most `process_interval_s` later.
"""

from __future__ import annotations

import numpy as np

from edge.ring import AudioBlock

# A block this many dB above the background counts as a likely onset. Block-to-block
# fluctuation of a steady background is well under 1 dB at 1024 frames; a few dB more keeps
# false wake-ups (which only cost a pipeline run) rare on gusty or pulsing backgrounds.
RISE_DB = 3.0
# How fast the background follows a rising level, per block (it follows a falling one at once):
# a sound lasting a few seconds becomes background, so its end and the next onset are seen.
RISE_FOLLOW = 0.02


class OnsetGate:
    """Fed every block on the audio thread; `update` returns True for a likely onset."""

    def __init__(self, rise_db: float = RISE_DB) -> None:
        self._factor = 10.0 ** (rise_db / 10.0)
        self._background = -1.0  # mean square; negative until the first block

    def update(self, block: AudioBlock) -> bool:
        """Mean square of the block against the background; follows the background."""
        flat = block.reshape(-1)
        power = float(np.dot(flat, flat)) / max(1, flat.size)
        background = self._background
        if background < 0.0 or power <= background:
            # Down at once: the background is the quiet level between sounds.
            self._background = power
            return False
        if power > background * self._factor:
            # A rise: fire once, then compare the next blocks against this level, so a sound
            # gives one wake-up and a further rise within it another.
            self._background = power
            return True
        self._background = background + RISE_FOLLOW * (power - background)
        return False
