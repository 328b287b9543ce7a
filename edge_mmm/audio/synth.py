"""Synthesize speech clips with espeak-ng + sox (Debian packages): the built-in example and test data."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.errors import MissingExtraError

EXAMPLE_SENTENCE = "Hello there. The weather today is sunny, with a high of twenty one degrees."

# Varied vocabulary, numbers and lengths (about 2-10 s at 150 words per minute); used by tests and benchmarks.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It was twenty three degrees outside this morning.",
    "My phone number is five five five, one two three four.",
    "The train leaves at seven forty five from platform nine.",
    "She sells sea shells by the sea shore.",
    "Turn left at the next intersection and then go straight for two miles.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Can you see the red car parked next to the old building?",
    "Water boils at one hundred degrees Celsius at sea level.",
    "I would like a cup of coffee with milk and no sugar, please.",
    "The library closes early on Sundays during the summer.",
    "Our flight was delayed by two hours because of the storm.",
    "Remember to buy eggs, bread, butter and a bottle of orange juice.",
    "The robot picked up the blue box and placed it on the shelf.",
    "In nineteen sixty nine, astronauts landed on the moon for the first time.",
    "How many people live in the city of Paris?",
    "The children played football in the park until it got dark.",
    "This camera can record video at sixty frames per second.",
    "Please speak slowly and clearly into the microphone.",
    "The doctor said I should drink more water and sleep eight hours a night.",
    "A rainbow appeared after the heavy rain stopped.",
    "The price of the ticket is fourteen dollars and fifty cents.",
    "We need to finish the report before the end of the week.",
    "The cat is sleeping on the warm windowsill.",
    "What is the name of the tallest mountain in the world?",
    "He opened the door slowly and looked inside the dark room.",
    "The computer restarted twice during the update last night.",
    "Add two cups of flour, one egg and a pinch of salt to the bowl.",
    "The museum has more than five thousand paintings on display.",
    "Good morning, what would you like to do today?",
    "Keep your hands on the wheel and your eyes on the road.",
]


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def synthesize(text: str, out_path: Path, voice: str = "en-us", speed: int = 150, pitch: int = 50,
               lead_silence: float = 0.0, trail_silence: float = 0.0) -> Path:
    """Speak `text` into a 16 kHz mono 16-bit WAV at `out_path` (written atomically). The same arguments give
    the same samples: sox resamples without dither (`-D`; its default adds random noise below one 16-bit step,
    which made every synthesis a little different, enough to flip a quantized Whisper's near-tie words)."""
    if not have_espeak():
        raise MissingExtraError("espeak-ng/sox", "dev", "synthesizing speech; on Debian: apt-get install espeak-ng sox")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True)
        tmp_out = Path(tmp) / "out.wav"
        cmd = ["sox", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(tmp_out)]
        if lead_silence or trail_silence:
            cmd += ["pad", str(lead_silence), str(trail_silence)]
        subprocess.run(cmd, check=True, capture_output=True)
        shutil.move(str(tmp_out), str(out_path))
    return out_path
