"""Speech records: where each clip comes from, and how one is decoded when a batch needs it.

An `AudioExample` holds a *reference* to its clip (a file path, encoded file bytes, or samples with
their rate), never the decoded waveform: a folder of a hundred thousand clips costs a few hundred
bytes a row until a batch asks for its audio (`decode_audio`). Sources:

- a class folder, `root/<label>/<clip>.wav|flac|ogg|mp3` (the label is the folder name);
- a JSONL/JSON/CSV/TSV/Parquet table with an audio column (a path relative to the table's folder,
  `{bytes, path}` as Hugging Face `datasets` stores audio, or `{array, sampling_rate}` as it decodes
  it) and a label column (audio-classification) or a transcript column (transcription);
- a saved `datasets` directory (its Arrow files, read with pyarrow).

Decoding uses `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3), mixes channels down to
mono and resamples with `soxr` (a maintained, high-quality resampler) to the model's rate.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.media import datasets_rows, folder_rows, is_datasets_dir, renamed_rows
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.records import summarize_problems
from tunesmith.errors import DataError

__all__ = [
    "AUDIO_SUFFIXES",
    "AudioExample",
    "AudioRef",
    "Clip",
    "audio_key",
    "clip_seconds",
    "decode_audio",
    "decode_native",
    "default_max_seconds",
    "longest_clip",
    "read_audio_table",
    "to_audio_examples",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


@dataclass(frozen=True, eq=False)
class Clip:
    """Decoded samples with their rate, as `datasets`' Audio feature gives them ({array, sampling_rate})."""

    samples: np.ndarray  # (N,) or (N, channels), any float or int dtype
    rate: int


# A path (str), encoded file bytes, or samples already decoded.
AudioRef = str | bytes | Clip


@dataclass(frozen=True, eq=False)
class AudioExample:
    """One speech example.

    Attributes:
        audio: where the samples are (see `AudioRef`); decoded only by `decode_audio`.
        label: the class (audio-classification); None for unlabelled input or a transcription row.
        text: the transcript (transcription); None elsewhere.
        where: the row's origin (`data.jsonl:12`, `root/yes/1.wav`).
    """

    audio: AudioRef
    label: str | None = None
    text: str | None = None
    where: str = ""

    def key(self) -> str:
        """What splits and samples hash: the clip's content, not its name, so copies move together."""
        return audio_key(self.audio)


def audio_key(ref: AudioRef) -> str:
    """A hash of the clip as stored: the file's bytes, or the samples and rate."""
    digest = hashlib.sha256()
    if isinstance(ref, Clip):
        samples = np.ascontiguousarray(ref.samples)
        digest.update(repr((ref.rate, samples.shape, str(samples.dtype))).encode())
        digest.update(samples.tobytes())
    elif isinstance(ref, bytes):
        digest.update(ref)
    else:
        try:
            digest.update(Path(ref).read_bytes())
        except OSError as exc:
            raise DataError(f"{ref}: cannot read the audio file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def decode_audio(ref: AudioRef, rate: int, where: str = "") -> np.ndarray:
    """The clip as float32 mono samples in [-1, 1] at `rate` Hz.

    Raises:
        DataError: naming `where` (or the path) when the file is missing, truncated, not audio, or empty.
    """
    samples, native = decode_native(ref, where)
    if native != rate:
        import soxr

        samples = soxr.resample(samples, native, rate).astype(np.float32, copy=False)
    return samples


def decode_native(ref: AudioRef, where: str = "") -> tuple[np.ndarray, int]:
    """The clip as float32 mono samples at its own rate, and that rate."""
    name = where or (ref if isinstance(ref, str) else "audio")
    if isinstance(ref, Clip):
        samples, native = np.asarray(ref.samples), int(ref.rate)
        if samples.dtype.kind in "iu":  # integer PCM: scale to [-1, 1]
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
        samples = samples.astype(np.float32, copy=False)
    else:
        import soundfile

        try:
            samples, native = soundfile.read(
                ref if isinstance(ref, str) else io.BytesIO(ref), dtype="float32", always_2d=True
            )
        except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
            raise DataError(f"{name}: cannot read the audio ({exc}); replace or remove it") from None
    if samples.ndim == 2:
        samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if samples.ndim != 1 or native <= 0:
        raise DataError(f"{name}: audio must be (samples,) or (samples, channels) with a positive rate")
    if len(samples) == 0:
        raise DataError(f"{name}: the audio is empty (0 samples); replace or remove it")
    return np.ascontiguousarray(samples, dtype=np.float32), int(native)


def clip_seconds(ref: AudioRef, where: str = "") -> float:
    """A clip's duration, from its header where it has one (nothing is decoded for a file)."""
    if isinstance(ref, Clip):
        return len(ref.samples) / ref.rate
    import soundfile

    try:
        info = soundfile.info(ref if isinstance(ref, str) else io.BytesIO(ref))
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        name = where or (ref if isinstance(ref, str) else "audio")
        raise DataError(f"{name}: cannot read the audio ({exc}); replace or remove it") from None
    return float(info.frames) / float(info.samplerate)


def longest_clip(examples: Sequence[AudioExample]) -> float:
    """The longest clip's duration in seconds; clips that cannot be read are skipped (the data gate
    names them), and with none readable the answer is 1 s."""
    longest = 0.0
    for ex in examples:
        try:
            longest = max(longest, clip_seconds(ex.audio, ex.where))
        except DataError:
            continue
    return longest or 1.0


def default_max_seconds(examples: Sequence[AudioExample]) -> float:
    """`data.max_seconds` when it is not set: the longest clip, rounded up to a tenth of a second
    (at most 30 s, Whisper's window)."""
    return min(30.0, max(0.1, math.ceil(longest_clip(examples) * 10 - 1e-9) / 10))


def read_audio_table(source: str, column_map: dict[str, str] | None) -> list[Row]:
    """Rows of any audio source: a class folder, a saved `datasets` directory, else a table file."""
    path = Path(source)
    if is_datasets_dir(path):
        return renamed_rows(datasets_rows(path), column_map)
    if path.is_dir():
        return folder_rows(path, AUDIO_SUFFIXES, "audio", "audio files")
    return read_rows(source, column_map)


def to_audio_examples(
    rows: Sequence[Row],
    audio_field: str,
    label_field: str | None,
    text_field: str | None,
    base: Path | None = None,
    label_map: dict[str, str] | None = None,
    require_targets: bool = True,
) -> list[AudioExample]:
    """Examples from rows, every row checked first (one `DataError` lists all bad rows).

    Args:
        label_field: the label column (audio-classification), or None.
        text_field: the transcript column (transcription), or None.
        base: the folder relative paths are taken against (the table's own).
        require_targets: whether each row must have its label or transcript (False for prediction).
    """
    from tunesmith.data.records import _label_text, _RowError  # one label rule for every task

    label_map = label_map or {}
    examples: list[AudioExample] = []
    problems: list[str] = []
    for row in rows:
        ref = _ref(row.data.get(audio_field), base)
        if ref is None:
            present = ", ".join(row.data) or "none"
            problems.append(
                f"{row.where}: field {audio_field!r} is missing or holds no audio "
                f"({type(row.data.get(audio_field)).__name__}; fields present: {present}); give a path, "
                "{bytes, path} or {array, sampling_rate}, or set data.audio_field"
            )
            continue
        label: str | None = None
        text: str | None = None
        if label_field is not None and not _blank(row.data.get(label_field)):
            try:
                label = _label_text(row.data[label_field], label_field)
            except _RowError as exc:
                problems.append(f"{row.where}: {exc}")
                continue
            label = label_map.get(label, label)
        if text_field is not None and isinstance(row.data.get(text_field), str):
            text = row.data[text_field].strip() or None
        if require_targets and label_field is not None and label is None:
            problems.append(f"{row.where}: no label in field {label_field!r}; give one or set data.label_field")
            continue
        if require_targets and text_field is not None and text is None:
            problems.append(
                f"{row.where}: no transcript in field {text_field!r} (a string); give one or set data.text_field"
            )
            continue
        examples.append(AudioExample(ref, label, text, row.where))
    if problems:
        raise DataError(summarize_problems(problems, "problem(s) in the audio data; fix them all, then run again"))
    return examples


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _ref(value: Any, base: Path | None) -> AudioRef | None:
    if isinstance(value, dict):  # Hugging Face datasets' Audio feature
        if value.get("array") is not None and value.get("sampling_rate"):
            return Clip(np.asarray(value["array"]), int(value["sampling_rate"]))
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    if isinstance(value, str) and value.strip():
        path = Path(value.strip()).expanduser()
        return str(path if path.is_absolute() or base is None else base / path)
    return None
