"""Audio: load a file as mono float32 at a sample rate (polyphase resampling, truncation
checks), and Whisper's log-mel features."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from torch import Tensor

from mmcompose.errors import MediaError
from mmcompose.model.media.common import AUDIO_EXTENSIONS, PathLike, _check_file, _corrupt


# --------------------------------------------------------------------------- audio
def _wav_truncation(p: Path) -> tuple[int, int] | None:
    """(declared, present) byte counts of a RIFF WAV's data chunk if it is cut short.

    libsndfile silently returns the partial audio of a truncated WAV (e.g. an interrupted
    download); catching it here avoids training on clips that are quietly too short.
    Streaming writers' placeholder sizes (0 or 0xFFFFFFFF) and RF64 are left to libsndfile.
    """
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, length = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                present = size - pos - 8
                if 0 < length < 0xFFFFFFFF and present < length:
                    return length, present
                return None
            pos += 8 + length + (length & 1)
    return None


def prepare_waveform(
    wave: np.ndarray | Tensor,
    orig_sample_rate: int,
    sample_rate: int = 16000,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Array already in memory -> float32 mono in [-1, 1] at ``sample_rate``.

    The in-memory twin of ``load_audio``: integer PCM is scaled to [-1, 1]; a 2-D array is
    (samples, channels) as soundfile returns it, or (channels, samples) as torchaudio does
    (the axis with at most 8 entries is taken as channels) and is averaged to mono.
    """
    arr = wave.detach().cpu().numpy() if isinstance(wave, Tensor) else np.asarray(wave)
    if orig_sample_rate <= 0 or sample_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sample_rate}, {sample_rate}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        mid = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed PCM, 128 for uint8
        arr = (arr.astype(np.float64) - mid) / (int(info.max) + 1 - mid)
    elif arr.dtype.kind != "f":
        raise MediaError(f"audio array must be numeric PCM, got dtype {arr.dtype}")
    if arr.ndim == 2:
        channels_last = arr.shape[1] <= 8 and arr.shape[0] >= arr.shape[1]
        arr = arr.mean(axis=1 if channels_last else 0, dtype=np.float64)
    elif arr.ndim != 1:
        raise MediaError(f"audio array must be 1-D or 2-D, got shape {arr.shape}")
    if max_seconds is not None:
        arr = arr[: math.ceil(max_seconds * orig_sample_rate)]
    if arr.size == 0:
        raise MediaError("audio contains no samples", hint="check that the clip is not empty")
    if not np.all(np.isfinite(arr)):
        raise MediaError("audio contains NaN or infinite samples")
    if orig_sample_rate != sample_rate:
        g = math.gcd(orig_sample_rate, sample_rate)
        arr = resample_poly(arr, sample_rate // g, orig_sample_rate // g)
    return np.clip(arr, -1.0, 1.0).astype(np.float32)


def load_audio(
    path: PathLike, sample_rate: int = 16000, max_seconds: float | None = None
) -> np.ndarray:
    """Load a wav/flac/ogg/mp3 file as float32 mono in [-1, 1] at ``sample_rate``.

    Resampling is polyphase (``resample_poly`` with the reduced up/down ratio), which is
    anti-aliased and exact for rational ratios like 44.1k -> 16k; only the first
    ``max_seconds`` are read, so long recordings are not decoded in full.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    p = _check_file(path, "audio", AUDIO_EXTENSIONS)
    if p.suffix.lower() == ".wav" and (cut := _wav_truncation(p)) is not None:
        raise MediaError(
            f"audio file is truncated: {p} (data chunk declares {cut[0]} bytes, "
            f"only {cut[1]} present)",
            hint="re-download or re-export it; to keep the partial audio, re-encode it "
            "(e.g. ffmpeg -i in.wav out.wav)",
        )
    try:
        with sf.SoundFile(p) as f:
            orig_sr = f.samplerate
            n = -1 if max_seconds is None else math.ceil(max_seconds * orig_sr)
            data = f.read(frames=n, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _corrupt("audio", p, exc) from exc
    if data.size == 0:
        raise MediaError(f"audio file contains no samples: {p}", hint="the clip is empty")
    try:
        return prepare_waveform(data, orig_sr, sample_rate, max_seconds)
    except MediaError as exc:
        raise MediaError(f"{exc.message}: {p}", hint=exc.hint) from exc


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel[log_part] = min_log_mel + np.log(hz[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    hz = mel * f_sp
    log_part = mel >= min_log_mel
    hz[log_part] = min_log_hz * np.exp(logstep * (mel[log_part] - min_log_mel))
    return hz


def mel_filter_bank(
    n_mels: int = 80,
    n_fft: int = 400,
    sample_rate: int = 16000,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters (n_mels, n_fft // 2 + 1), float64.

    Equals ``librosa.filters.mel(sr, n_fft, n_mels)``, which Whisper ships as mel_filters.npz;
    computing it here avoids downloading that file.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_lo, mel_hi = _hz_to_mel(np.array([f_min, f_max]))
    edges = _mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per filter


def log_mel_spectrogram(
    wave: np.ndarray | Tensor,
    *,
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sample_rate: int = 16000,
    n_frames: int | None = 3000,
) -> Tensor:
    """Whisper's log-mel features (n_mels, n_frames) float32 from a mono waveform.

    Matches ``WhisperFeatureExtractor``: zero-pad/trim to ``n_frames * hop_length`` samples
    (``None`` keeps the whole clip: len // hop frames), centred STFT with a periodic Hann
    window, drop the last frame, power -> Slaney mel -> log10 (clamped at 1e-10), floor at
    max - 8, then (x + 4) / 4 so values sit roughly in [-1, 1].
    """
    w = wave.detach().cpu().to(torch.float32) if isinstance(wave, Tensor) else None
    if w is None:
        w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if w.ndim != 1:
        raise MediaError(
            f"log_mel_spectrogram expects a 1-D mono waveform, got shape {tuple(w.shape)}"
        )
    if n_frames is not None:
        target = n_frames * hop_length
        w = (
            w[:target]
            if w.numel() >= target
            else torch.nn.functional.pad(w, (0, target - w.numel()))
        )
    if w.numel() <= n_fft // 2:  # reflect padding in the centred STFT needs more samples
        w = torch.nn.functional.pad(w, (0, n_fft // 2 + 1 - w.numel()))
    window = torch.hann_window(n_fft, periodic=True)
    stft = torch.stft(w, n_fft, hop_length, window=window, center=True, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filter_bank(n_mels, n_fft, sample_rate)).to(torch.float32)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).contiguous()
