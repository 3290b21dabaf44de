"""Make the synthetic speech data shipped in examples/data/, with espeak-ng.

Writes two data sets beside this file:

- ``spoken-commands/{train,validation,test}/<label>/<voice>_s<speed>_p<pitch>.ogg``: keyword
  spotting, 20 labels (the digits "zero".."nine" and ten command words), 40 / 10 / 10 clips per
  label in train / validation / test.
- ``spoken-sentences/{train,validation,test}.jsonl`` and ``spoken-sentences/clips/``: transcription,
  300 short smart-home commands ("set a timer for five minutes") made from templates, 240 / 30 / 30,
  no sentence in more than one split. Each row is ``{"audio": "clips/<name>.ogg", "text": ...}``;
  the audio path is relative to the JSONL file.

A voice is an espeak-ng accent with a voice variant ("en-us" + "m3"). The splits are by voice: the
16 held-out voices (8 validation, 8 test, one of each per accent) never speak in train. Every accent
and every variant is heard in train, only not in the held-out pairs. Clips are 16 kHz mono
OGG/Vorbis, silence trimmed to 50 ms either side (padded to 0.4 s where shorter), peak-normalised
to -1 dBFS.

Needs the Debian package ``espeak-ng`` (made with 1.51; ``apt-get install espeak-ng``) and the
Python packages numpy, soundfile and soxr. Re-run from the repository root with

    python examples/data/make_speech_data.py

It takes about 40 s on two CPU cores, in one process. The draws (voices, speeds, pitches,
sentences) come from a fixed seed, and espeak-ng is deterministic, so a re-run gives the same
audio; the .ogg bytes differ only in the Ogg stream serial numbers, which libsndfile picks at
random. Each data set is built in a ``.partial`` folder and moved into place when complete.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SEED = 20240611
HERE = Path(__file__).resolve().parent
RATE = 16_000
MARGIN_S = 0.05  # silence kept either side of the speech
MIN_S = 0.4  # a shorter clip (a fast "up") is padded with silence, evenly either side, to this length
SILENCE_DB = -35.0  # a 10 ms frame this far below the loudest frame counts as silence
PEAK = 10 ** (-1 / 20)  # -1 dBFS, a little headroom for the Vorbis coder's overshoot
VORBIS_COMPRESSION = 0.9  # libsndfile's 0..1 scale; most of a short clip is the ~3.6 KB Vorbis header

# `espeak-ng --voices=en`. "en" is British English (gmw/en); "en-gb" would do, except that it drops
# a "+variant" without a word. The mbrola voices (mb-*, en-uk) need the mbrola package, not installed.
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# `espeak-ng --voices=variant`: the plain male and female voices and three Klatt synthesiser voices.
# Left out: whisper voices, f5 (mostly breath), klatt6 (the same audio as klatt), the novelty voices.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3")
SPLITS = ("train", "validation", "test")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
CLIPS_PER_LABEL = {"train": 40, "validation": 10, "test": 10}
COMMAND_SPEEDS = (130, 200)  # words per minute, inclusive
COMMAND_PITCHES = (20, 80)  # espeak-ng's 0..99 scale, inclusive

SENTENCES_PER_SPLIT = {"train": 240, "validation": 30, "test": 30}
SENTENCE_SPEEDS = (140, 190)
SENTENCE_PITCHES = (20, 80)

Voice = tuple[str, str]  # (accent, variant)
Maker = Callable[[Path, dict[str, list[Voice]], random.Random], dict[str, int]]


def split_voices(rng: random.Random) -> dict[str, list[Voice]]:
    """Hold out one validation and one test voice per accent, each with a different variant.

    Returns:
        The voices of each split; the three lists are disjoint and cover every accent × variant.
    """
    order = list(VARIANTS)
    rng.shuffle(order)
    validation = [(accent, order[i]) for i, accent in enumerate(ACCENTS)]
    test = [(accent, order[(i + len(ACCENTS)) % len(order)]) for i, accent in enumerate(ACCENTS)]
    held_out = set(validation) | set(test)
    train = [(accent, variant) for accent in ACCENTS for variant in VARIANTS if (accent, variant) not in held_out]
    return {"train": train, "validation": validation, "test": test}


def synthesise(text: str, voice: Voice, speed: int, pitch: int) -> np.ndarray:
    """Speak `text` with espeak-ng; returns 16 kHz mono float32 audio, trimmed and peak-normalised."""
    accent, variant = voice
    command = ["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch), "--stdout", text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"{' '.join(command)!r} failed: {result.stderr.decode(errors='replace').strip()}")
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")  # (N,) at 22050 Hz
    audio = soxr.resample(audio, rate, RATE)
    return _normalise(_pad(_trim(audio)))


def _trim(audio: np.ndarray) -> np.ndarray:
    """Cut leading and trailing silence down to MARGIN_S, by a frame-energy threshold."""
    frame = RATE // 100
    frames = len(audio) // frame
    rms = np.sqrt((audio[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))  # (frames,)
    loud = np.flatnonzero(rms > rms.max() * 10 ** (SILENCE_DB / 20))
    margin = int(MARGIN_S * RATE)
    start = max(0, loud[0] * frame - margin)
    end = min(len(audio), (loud[-1] + 1) * frame + margin)
    return audio[start:end]


def _pad(audio: np.ndarray) -> np.ndarray:
    missing = max(0, int(MIN_S * RATE) - len(audio))
    return np.pad(audio, (missing // 2, missing - missing // 2))


def _normalise(audio: np.ndarray) -> np.ndarray:
    return (audio * (PEAK / np.abs(audio).max())).astype(np.float32)


def write_ogg(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, RATE, format="OGG", subtype="VORBIS", compression_level=VORBIS_COMPRESSION)


def clip_name(voice: Voice, speed: int, pitch: int) -> str:
    """`en-gb-x-rp_m3_s165_p42`: accent, variant, words per minute, pitch."""
    return f"{voice[0]}_{voice[1]}_s{speed}_p{pitch}"


def make_commands(out: Path, voices: dict[str, list[Voice]], rng: random.Random) -> dict[str, int]:
    """Write the keyword-spotting clips under `out`; returns the number of clips per split."""
    counts = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        for label in DIGITS + COMMANDS:
            names: set[str] = set()
            while len(names) < CLIPS_PER_LABEL[split]:
                voice = rng.choice(voices[split])
                speed, pitch = rng.randint(*COMMAND_SPEEDS), rng.randint(*COMMAND_PITCHES)
                name = clip_name(voice, speed, pitch)
                if name in names:  # the same voice, speed and pitch again: draw another
                    continue
                names.add(name)
                write_ogg(out / split / label / f"{name}.ogg", synthesise(label, voice, speed, pitch))
            counts[split] += len(names)
    return counts


def _number(n: int) -> str:
    """1..59 as words: 7 -> "seven", 45 -> "forty five"."""
    ones = ("", *DIGITS[1:], "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen")  # fmt: skip
    tens = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}
    if n < 20:
        return ones[n]
    return tens[n // 10] + (f" {ones[n % 10]}" if n % 10 else "")


ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "hallway", "garage", "office")
PEOPLE = ("mom", "dad", "grandma", "anna", "james", "sarah", "the doctor", "my brother")
ARTISTS = ("the beatles", "queen", "abba", "coldplay", "adele", "madonna", "the rolling stones", "elvis presley")
GENRES = ("jazz", "rock", "classical", "country", "relaxing", "happy")
CITIES = ("london", "paris", "berlin", "boston", "chicago", "tokyo", "madrid")
CHORES = ("water the plants", "buy milk", "call the bank", "take out the trash", "feed the cat", "pay the rent")
ITEMS = ("milk", "eggs", "bread", "apples", "coffee", "rice", "butter", "cheese", "bananas")
DAYS = ("today", "tomorrow", "tonight", "this evening", "on monday", "on friday", "this weekend")
DOORS = ("front door", "back door", "garage door", "window")


def _time(rng: random.Random) -> str:
    """A clock time in words: "seven", "seven thirty", "seven in the morning"."""
    hour, day_hour = _number(rng.randint(1, 12)), _number(rng.randint(5, 11))
    minute = _number(rng.choice((15, 30, 45)))
    return rng.choice((hour, f"{hour} {minute}", f"{day_hour} in the morning", f"{day_hour} in the evening"))


def _minutes(rng: random.Random) -> str:
    return _number(rng.choice((2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 45)))


TEMPLATES = (
    lambda r: f"set a timer for {_minutes(r)} minutes",
    lambda r: f"set a {_minutes(r)} minute timer for the {r.choice(('pasta', 'eggs', 'rice', 'oven', 'tea'))}",
    lambda r: f"set an alarm for {_time(r)}",
    lambda r: f"wake me up at {_time(r)} {r.choice(('tomorrow', 'on monday', 'on friday'))}",
    lambda r: f"turn the {r.choice(ROOMS)} lights {r.choice(('on', 'off'))}",
    lambda r: f"turn {r.choice(('on', 'off'))} the lights in the {r.choice(ROOMS)}",
    lambda r: f"dim the {r.choice(ROOMS)} lights to {_number(r.choice((10, 20, 30, 40, 50)))} percent",
    lambda r: f"call {r.choice(PEOPLE)} at {_time(r)}",
    lambda r: f"send a message to {r.choice(PEOPLE)} saying i am {r.choice(('late', 'home', 'on my way'))}",
    lambda r: f"play the next song by {r.choice(ARTISTS)}",
    lambda r: f"play some {r.choice(GENRES)} music in the {r.choice(ROOMS)}",
    lambda r: f"play {r.choice(ARTISTS)} in the {r.choice(ROOMS)}",
    lambda r: f"set the thermostat to {_number(r.randint(16, 25))} degrees",
    lambda r: f"remind me to {r.choice(CHORES)} {r.choice(DAYS)}",
    lambda r: f"remind me to {r.choice(CHORES)} at {_time(r)}",
    lambda r: f"add {r.choice(ITEMS)} to the shopping list",
    lambda r: "add {} and {} to my shopping list".format(*r.sample(ITEMS, 2)),
    lambda r: f"what is the weather in {r.choice(CITIES)} {r.choice(DAYS)}",
    lambda r: f"will it rain in {r.choice(CITIES)} {r.choice(DAYS)}",
    lambda r: f"{r.choice(('lock', 'close', 'open'))} the {r.choice(DOORS)} please",
)


def draw_sentences(rng: random.Random, count: int) -> list[str]:
    """`count` different sentences of 4 to 10 words, from TEMPLATES."""
    sentences: dict[str, None] = {}  # a set that keeps the drawing order
    while len(sentences) < count:
        sentence = rng.choice(TEMPLATES)(rng)
        if 4 <= len(sentence.split()) <= 10:
            sentences[sentence] = None
    return list(sentences)


def make_sentences(out: Path, voices: dict[str, list[Voice]], rng: random.Random) -> dict[str, int]:
    """Write the transcription clips and one JSONL per split under `out`; returns rows per split."""
    sentences = draw_sentences(rng, sum(SENTENCES_PER_SPLIT.values()))
    rng.shuffle(sentences)
    counts = {}
    start = 0
    for split in SPLITS:
        rows = []
        for index, text in enumerate(sentences[start : start + SENTENCES_PER_SPLIT[split]]):
            voice = rng.choice(voices[split])
            speed, pitch = rng.randint(*SENTENCE_SPEEDS), rng.randint(*SENTENCE_PITCHES)
            audio_path = f"clips/{split}-{index:03d}_{clip_name(voice, speed, pitch)}.ogg"
            write_ogg(out / audio_path, synthesise(text, voice, speed, pitch))
            rows.append({"audio": audio_path, "text": text})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts[split] = len(rows)
        start += SENTENCES_PER_SPLIT[split]
    return counts


def _build(name: str, make: Maker, voices: dict[str, list[Voice]], rng: random.Random) -> dict[str, int]:
    """Build data set `name` in a `.partial` folder, then swap it in for the old one."""
    final, partial = HERE / name, HERE / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts = make(partial, voices, rng)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return counts


def main() -> int:
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is not on PATH; install it with `apt-get install espeak-ng`.", file=sys.stderr)
        return 1
    started = time.perf_counter()
    voices = split_voices(random.Random(SEED))
    for split in SPLITS:
        print(f"{split}: {len(voices[split])} voices: {' '.join('+'.join(v) for v in voices[split])}")
    # One generator per data set, so that changing one leaves the other's draws as they were.
    commands = _build("spoken-commands", make_commands, voices, random.Random(SEED + 1))
    print(f"spoken-commands: {commands} clips")
    sentences = _build("spoken-sentences", make_sentences, voices, random.Random(SEED + 2))
    print(f"spoken-sentences: {sentences} rows")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
