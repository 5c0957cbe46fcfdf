"""The ``edgec`` command line: compile, inspect, run, bench, targets.

Errors print one line (``--debug`` adds the traceback) and exit 1 (failed) or 2 (bad usage/input).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgec.errors import EdgecError, InputError

out = Console()
err = Console(stderr=True)


class EdgecGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgecError as exc:
            if ctx.params.get("debug"):
                raise
            # one line even when piped: rich would wrap at 80 columns, and backend messages carry newlines
            message = " ".join(str(exc.args[0] if exc.args else exc).split())
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)


@click.group(cls=EdgecGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="edgec")
def main(debug: bool) -> None:
    """edgec: compile ONNX models into verified on-device bundles, and run them."""


def _shapes(specs: tuple[str, ...], flag: str) -> dict[str, list[int]]:
    from edgec.compiler.frontend import parse_input_shapes

    return parse_input_shapes(specs, flag)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="cpu", show_default=True, help="Target to compile for (see `edgec targets`).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Bundle to write (NAME.edgec, or NAME.zip for one file).")
@click.option("--input-shape", multiple=True, metavar="NAME=D1,D2,...", help="Fix an input's shape in the artifact.")
@click.option("--sample-shape", multiple=True, metavar="NAME=D1,D2,...", help="Shape of generated verification inputs (the artifact stays dynamic).")
@click.option("--calib", type=click.Path(path_type=Path), help="Real inputs: a .npz, a folder of .npz/.npy files, images (.png/.jpg/.jpeg/.bmp, a file or folder), or text (a .txt of one sample per line, or a folder of .txt files).")
@click.option("--calib-mean", metavar="M[,M,M]", help="Images: subtract this mean from [0, 1] pixels, one value or one per channel in the model's order (default 0, or the model's metadata).")
@click.option("--calib-std", metavar="S[,S,S]", help="Images: then divide by this std, one value or one per channel (default 1, or the model's metadata).")
@click.option("--calib-bgr", is_flag=True, help="Images: feed channels in BGR order.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Text: the tokenizer.json to use (default: tokenizer.json next to MODEL).")
@click.option("--calib-max-length", type=click.IntRange(min=1), metavar="N", help="Text: pad/truncate to N tokens when the model's sequence length is dynamic (default 128).")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(min=1), help="How many samples to verify with.")
@click.option("--tolerance", type=float, help="Largest allowed error relative to the output's magnitude (default 1e-3; not applied to quantized bundles unless given).")
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic", "int4", "fp16"]), help="Quantize: int8 (static, needs --calib), int8-dynamic, int4 (weights), fp16.")
@click.option("--calibration", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True, help="How int8 activation ranges are chosen.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration samples to read at most.")
@click.option("--max-accuracy-drop", metavar="X%", help="Promote the most sensitive layers a step (int4 -> int8 -> float) until the accuracy drop vs float is at most this (e.g. 0.5%).")
@click.option("--keep-float", multiple=True, metavar="NODE", help="Keep this layer in float (repeatable).")
@click.option("--precision", "precision_rules", multiple=True, metavar="PATTERN=PRECISION",
              help="Give the layers whose name or op type matches the glob PATTERN int8, int8-dynamic, int4, fp16 or float "
                   "instead of --quantize's mode (repeatable; the last match wins), e.g. --precision Conv=int8.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True, help="int4 block size.")
@click.option("--asymmetric", is_flag=True, help="int4 with zero points (default symmetric).")
@click.option("--int4-method", type=click.Choice(["rtn", "hqq"]), default="rtn", show_default=True, help="int4 rounding: round-to-nearest or HQQ.")
@click.option("--int4-accuracy", type=click.Choice(["fast", "exact"]), default="fast", show_default=True,
              help="fast: int4 kernels may quantize activations to int8; exact: float accumulation (slower).")
@click.option("--disable-pass", multiple=True, metavar="NAME", help="Skip a pass (repeatable).")
@click.option("--check-each-pass", is_flag=True, help="Check the model after every pass.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--zip", "as_zip", is_flag=True, help="Write the single-file zip form (also implied by -o NAME.zip).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile(model, target, output, input_shape, sample_shape, calib, calib_mean, calib_std, calib_bgr, tokenizer, calib_max_length,
            samples, tolerance, quantize, calibration, calib_samples, max_accuracy_drop, keep_float, precision_rules, block_size, asymmetric,
            int4_method, int4_accuracy, disable_pass, check_each_pass, force, as_zip, quiet, as_json):
    """Compile MODEL (.onnx) for a target into a verified bundle."""
    import edgec
    from edgec.compiler.quantize import QuantOptions
    from edgec.compiler.samples import CalibOptions

    calib_options = CalibOptions(mean=calib_mean, std=calib_std, bgr=calib_bgr, tokenizer=tokenizer, max_length=calib_max_length)
    if calib is None and calib_options.given():
        flags = list(calib_options.given())
        raise InputError(f"{', '.join(flags)} {'needs' if len(flags) == 1 else 'need'} --calib: images or text to read")
    quant = None
    if quantize:
        quant = QuantOptions(
            mode=quantize, calibration=calibration, block_size=int(block_size), symmetric=not asymmetric,
            int4_method=int4_method, int4_accuracy=int4_accuracy, max_accuracy_drop=_fraction(max_accuracy_drop), keep_float=keep_float,
            precision=tuple(_precision_rule(r) for r in precision_rules),
        )
    elif max_accuracy_drop or keep_float or precision_rules:
        raise InputError("--max-accuracy-drop, --keep-float and --precision need --quantize")

    if output is None:
        output = Path(f"{model.stem}.edgec" + (".zip" if as_zip else ""))
    elif as_zip and output.suffix != ".zip":
        output = output.with_name(output.name + ".zip")
    show = not quiet and not as_json
    with err.status("compiling", spinner="dots") if show else _nothing() as status:
        bundle = edgec.compile(
            model, target, output,
            input_shapes=_shapes(input_shape, "--input-shape"), sample_shapes=_shapes(sample_shape, "--sample-shape"), calib=calib,
            calib_options=calib_options,
            samples_count=samples, tolerance=tolerance, quantize=quant, calib_samples=calib_samples, disable_passes=disable_pass,
            check_each_pass=check_each_pass, force=force,
            progress=(lambda msg: status.update(msg)) if show else None,
        )
    if as_json:
        click.echo(json.dumps(bundle.manifest, indent=2))
    elif not quiet:
        _summary(bundle.manifest, output)
    bundle.close()


def _precision_rule(text: str) -> tuple[str, str]:
    pattern, sep, precision = text.rpartition("=")
    if not sep or not pattern:
        raise InputError(f"--precision {text!r}: give PATTERN=PRECISION, e.g. MatMul=int4 or '*attention*=float'")
    return pattern, precision


def _fraction(text: str | None) -> float | None:
    """'0.5%' -> 0.005, '0.005' -> 0.005."""
    if text is None:
        return None
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--max-accuracy-drop {text!r}: give a percentage like 0.5% or a fraction like 0.005") from None


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _summary(m: dict, output: Path) -> None:
    v = m["verification"]
    worst = v["outputs"][v["worst_output"]]
    size = sum(f["size"] for f in m["files"].values())
    nodes = (m["passes"][0]["nodes_before"], m["passes"][-1]["nodes_after"]) if m["passes"] else (0, 0)
    devices = ", ".join(f"{n} on {d}" for d, n in m["placement"]["devices"].items())
    out.print(f"[green]✓[/] {output}  target={m['target']}  {size / 1e6:.1f} MB  nodes {nodes[0]} → {nodes[1]}")
    out.print(f"  verified on {v['samples']} {v['data']} samples: max abs err {worst['max_abs']:.3g}, cosine {worst['cosine']:.6f}"
              + (f", top-1 {worst['top1']:.3f}" if "top1" in worst else ""))
    if "perplexity" in v:
        out.print(f"  perplexity on real text: source {v['perplexity']['source']:.2f}, bundle {v['perplexity']['artifact']:.2f}")
    out.print(f"  placement: {devices}")
    q = m.get("quantization")
    if q:
        kept = [layer["node"] for layer in q["layers"] if layer["precision"] == "float"]
        acc = q["accuracy"]
        before = f"{q['weight_bytes_before'] / 1e6:.2f} → " if q["weight_bytes_before"] else ""
        out.print(f"  quantized {q['mode']}: weights {before}{q['weight_bytes_after'] / 1e6:.2f} MB ({q['weights']})"
                  + (f", {len(q['layers']) - len(kept)}/{len(q['layers'])} layers quantized" if q["layers"] else "")
                  + (f", {acc['metric']} drop {acc['drop']:.3%}" + (f" (budget {acc['budget']:.3%})" if acc["budget"] is not None else "") if acc else ""))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--nodes", is_flag=True, help="List every node's placement.")
def inspect(bundle, as_json, nodes):
    """Show a bundle: signature, passes, verification, placement, sizes."""
    from edgec.bundle import open_bundle

    b = open_bundle(bundle)
    try:
        m = b.manifest
        placement = json.loads((b.path / "reports" / "placement.json").read_text()) if "reports/placement.json" in m["files"] else []
        if as_json:
            click.echo(json.dumps({**m, "placement_nodes": placement} if nodes else m, indent=2))
            return
        _inspect(m, placement, nodes)
    finally:
        b.close()


def _inspect(m: dict, placement: list[dict], nodes: bool) -> None:
    from edgec.signature import show_shape

    src = m["source"]
    out.print(f"[bold]{m['name']}[/]  target [cyan]{m['target']}[/]  schema {m['schema_version']}  created {m['created']}")
    out.print(f"source {src['path']}  sha256 {src['sha256'][:16]}…  {src['size'] / 1e6:.2f} MB  opset {src['opset']} → {m['opset']}")
    sig = Table("", "name", "dtype", "shape", title="signature", title_justify="left")
    for kind in ("inputs", "outputs"):
        for s in m[kind]:
            sig.add_row(kind[:-1], escape(s["name"]), s["dtype"] or "?", escape(show_shape(s["shape"])))
    out.print(sig)
    files = Table("file", "bytes", "sha256", title="files", title_justify="left")
    for name, f in m["files"].items():
        files.add_row(name, f"{f['size']:,}", f["sha256"][:16] + "…")
    out.print(files)
    passes = Table("pass", "nodes", "weight bytes", "ms", "changes", title="passes", title_justify="left")
    for p in m["passes"]:
        changes = ", ".join(f"{k} {v}" for k, v in p["changes"].items() if v)
        passes.add_row(p["name"], f"{p['nodes_before']} → {p['nodes_after']}", f"{p['bytes_before']:,} → {p['bytes_after']:,}", f"{p['ms']:.1f}", changes)
    out.print(passes)
    v = m["verification"]
    ver = Table("output", "max abs", "mean abs", "rel err", "cosine", "top-1",
                title=f"verification: {v['samples']} {v['data']} samples, tolerance {v['tolerance'] if v['tolerance'] is not None else 'not applied'}, {'passed' if v['passed'] else 'FAILED'}",
                title_justify="left")
    for name, o in v["outputs"].items():
        ver.add_row(name, f"{o['max_abs']:.3g}", f"{o['mean_abs']:.3g}", f"{o['rel_err']:.3g}", f"{o['cosine']:.6f}",
                    f"{o['top1']:.4f}" if "top1" in o else "-")
    out.print(ver)
    if "perplexity" in v:
        ref = f" ({v['reference']})" if "reference" in v else ""
        out.print(f"perplexity on {v['data'].removeprefix('text:')}: reference{escape(ref)} {v['perplexity']['source']:.2f}, "
                  f"bundle {v['perplexity']['artifact']:.2f}")
    q = m.get("quantization")
    if q:
        acc = q["accuracy"] or {}
        title = (f"quantization {q['mode']}: weights {q['weights']}, activations {q['activations']}"
                 + (f", calibration {q['calibration']}" if q["calibration"] else "")
                 + (f"; weights {q['weight_bytes_before']:,} → {q['weight_bytes_after']:,} bytes" if q["weight_bytes_before"] else "")
                 + (f"; {acc['metric']} drop {acc['drop']:.3%} on {acc['samples']} samples" if acc else "")
                 + (f" (budget {acc['budget']:.3%})" if acc.get("budget") is not None else ""))
        layers = Table("layer", "op", "precision", "weights KB", "sensitivity", "why", title=escape(title), title_justify="left")
        for layer in q["layers"]:
            sens = f"{layer['sensitivity']:.3%}" if "sensitivity" in layer else "-"
            if "sensitivity_middle" in layer:  # the drop with only this layer one step up (the budget's second ranking)
                sens += f" ({layer['sensitivity_middle']:.3%} one step up)"
            size = f"{layer['weight_bytes'][0] / 1e3:,.0f} → {layer['weight_bytes'][1] / 1e3:,.0f}" if "weight_bytes" in layer else "-"
            layers.add_row(escape(layer["node"]), layer["op"], layer["precision"], size, sens, escape(layer["reason"]))
        out.print(layers)
    ops: dict[tuple[str, str], int] = {}
    for p in placement:
        ops[(p["op"], p["device"])] = ops.get((p["op"], p["device"]), 0) + 1
    place = Table("op", "count", "runs on", title="placement by op", title_justify="left")
    for (op, device), count in sorted(ops.items(), key=lambda kv: -kv[1]):
        place.add_row(op, str(count), device)
    out.print(place)
    for f in m["placement"]["fallbacks"]:
        out.print(f"  [yellow]fallback[/] {escape(f['node'])} ({f['op']}) → {f['device']}: {escape(f['reason'])}")
    if nodes:
        table = Table("node", "op", "device", "reason", title="nodes", title_justify="left")
        for p in placement:
            table.add_row(escape(p["node"]), p["op"], p["device"], escape(p["reason"]))
        out.print(table)
    out.print(escape(f"runtime {m['runtime']}"))
    out.print("tools " + ", ".join(f"{k} {v}" for k, v in m["tools"].items() if k != "platform"))


def sampling_options(fn):
    """The generation flags shared by run --prompt, chat and serve-side defaults."""
    for option in reversed([
        click.option("--max-tokens", type=int, default=256, show_default=True, help="Most new tokens."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: off)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below min-p × the top probability."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="> 1 discourages repeats."),
        click.option("--seed", type=int, help="Makes sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop at this text (repeatable)."),
    ]):
        fn = option(fn)
    return fn


def _sampling(kw: dict):
    from edgec.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=kw["max_tokens"], temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                          min_p=kw["min_p"], repetition_penalty=kw["repetition_penalty"], seed=kw["seed"],
                          stop=list(kw["stop"])).validate()


def _stream(chunks) -> object:
    """Print chunks as they come; return the last (it carries finish_reason, usage, timings)."""
    last = None
    for chunk in chunks:
        click.echo(chunk.text, nl=False)
        last = chunk
    click.echo()
    return last


def _read_inputs(specs: tuple[str, ...], inputs: list[dict]) -> dict[str, np.ndarray]:
    """``--input x=a.npy`` (repeatable) or ``--input all.npz``."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        path = Path(file if sep else name)
        if not path.is_file():
            raise InputError(f"--input {spec}: no such file {path}")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    feeds.update({k: data[k] for k in data.files})
            else:
                if not sep:
                    if len(inputs) != 1:
                        raise InputError(f"--input {spec}: name the input (NAME=FILE.npy); inputs are {[i['name'] for i in inputs]}")
                    name = inputs[0]["name"]
                feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"--input {spec}: not a readable .npy/.npz file ({exc})") from None
    return feeds


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "-i", "input_specs", multiple=True, metavar="NAME=FILE.npy | FILE.npz", help="Input tensors.")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Write each output as NAME.npy here.")
@click.option("--prompt", "-p", help="Decoder bundles: the text to continue (as a chat turn if the model has a template).")
@click.option("--raw", is_flag=True, help="With --prompt: continue the text as is, without the chat template.")
@sampling_options
@click.option("--policy", type=click.Path(path_type=Path), help="With --prompt: route between the device and the cloud per this policy.toml (docs/hybrid.md).")
@click.option("--explain", is_flag=True, help="With --policy: print the route and the reasons.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="With --policy: the latency budget.")
@click.option("--local-only", is_flag=True, help="With --policy: never send this request off the device.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(bundle, input_specs, output_dir, prompt, raw, policy, explain, deadline, local_only, as_json, **sampling):
    """Run a bundle on input tensors, or generate text from a decoder bundle with --prompt."""
    import edgec

    if prompt is None and (policy or explain or deadline or local_only):
        raise InputError("--policy, --explain, --deadline and --local-only need --prompt")
    if policy is None and (explain or deadline or local_only):
        raise InputError("--explain, --deadline and --local-only need --policy")
    if prompt is not None:
        routing = None if policy is None else {"policy": policy, "deadline_s": deadline, "local_only": local_only}
        return _run_prompt(bundle, prompt, raw, as_json, _sampling(sampling), routing, explain)
    with edgec.load(bundle) as model:
        if not hasattr(model, "run"):
            raise InputError(f"{bundle} is a decoder bundle: give --prompt TEXT (or use `edgec chat`)")
        feeds = _read_inputs(input_specs, model.inputs)
        if not feeds:
            raise InputError(f"no inputs given; the model takes {[i['name'] for i in model.inputs]}: use --input NAME=FILE.npy")
        results = model.run(feeds)
    if output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, value in results.items():
            np.save(output_dir / f"{_safe_name(name)}.npy", value)
    summary = {name: {"shape": list(v.shape), "dtype": str(v.dtype), "min": float(v.min()) if v.size else None,
                      "max": float(v.max()) if v.size else None} for name, v in results.items()}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for name, s in summary.items():
            out.print(escape(f"{name}: {s['dtype']} {s['shape']}  min {s['min']:.4g}  max {s['max']:.4g}"))
        if output_dir:
            out.print(f"outputs written to {output_dir}/")


def _run_prompt(bundle: Path, prompt: str, raw: bool, as_json: bool, params, routing: dict | None = None,
                explain: bool = False) -> None:
    import edgec

    with edgec.load(bundle) as llm:
        if not hasattr(llm, "generate"):
            raise InputError(f"{bundle} is not a decoder bundle: --prompt needs one (compile a GGUF or an `edgec import` folder)")
        chat = not raw and bool(llm.generation.get("chat_template"))
        messages = [{"role": "user", "content": prompt}]
        options = {}
        if routing is not None:
            llm = edgec.HybridLLM(local=llm, policy=routing.pop("policy"))
            options = routing
        if as_json:
            done = llm.chat(messages, params, **options) if chat else llm.generate(prompt, params, **options)
            result = {"text": done.text, "finish_reason": done.finish_reason, "usage": vars(done.usage),
                      "timings": vars(done.timings)}
            if routing is not None:
                result.update(route=done.route, reasons=[r.as_dict() for r in done.reasons])
            click.echo(json.dumps(result, indent=2))
            return
        last = _stream(llm.chat(messages, params, stream=True, **options) if chat
                       else llm.generate(prompt, params, stream=True, **options))
        if last is not None and last.timings is not None:
            t = last.timings
            err.print(f"[dim]{last.usage.completion_tokens} tokens, {last.finish_reason}; time to first token "
                      f"{t.time_to_first_token * 1e3:.0f} ms, decode {t.decode_tokens_per_second:.1f} tok/s[/]")
        if explain:
            err.print(f"route: [bold]{last.route}[/]", highlight=False)
            for reason in last.reasons:
                err.print(f"  {reason.code}: {escape(reason.text)}", highlight=False, soft_wrap=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", help="A system message to start the conversation with.")
@sampling_options
def chat(bundle, system, **sampling):
    """Chat with a decoder bundle: streaming answers, history kept. /reset clears it, /exit or Ctrl-D ends."""
    import edgec

    params = _sampling(sampling)
    with edgec.load(bundle) as llm:
        if not hasattr(llm, "chat"):
            raise InputError(f"{bundle} is not a decoder bundle")
        start = [{"role": "system", "content": system}] if system else []
        history = list(start)
        err.print(f"[dim]{llm.name}: context {llm.context_length} tokens. /reset, /exit[/]")
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if line.strip() == "/reset":
                history = list(start)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                chunks = llm.chat(history, params, stream=True, truncate="left")
                pieces = []
                for chunk in chunks:
                    click.echo(chunk.text, nl=False)
                    pieces.append(chunk.text)
                click.echo()
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                click.echo(" [stopped]")
            history.append({"role": "assistant", "content": "".join(pieces)})


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; 0.0.0.0 is every interface (set --api-key then).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--name", help="The model id clients send as `model` (default: BUNDLE's name without .edgec/.zip).")
@click.option("--api-key", envvar="EDGEC_API_KEY", help="Require `Authorization: Bearer KEY` (also read from EDGEC_API_KEY).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=0), help="Requests that may wait while one generates; more get 429.")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), help="Largest max_tokens a request may ask for (also caps the default).")
@click.option("--max-request-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1), help="Largest request body; larger gets 413.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: one per core).")
@click.option("--policy", type=click.Path(path_type=Path), help="Route each request between the device and the cloud per this policy.toml (docs/hybrid.md).")
def serve(bundle, host, port, name, api_key, max_queue, max_tokens_limit, max_request_bytes, threads, policy):
    """Serve a decoder BUNDLE as an OpenAI-compatible API at http://HOST:PORT/v1 (needs the server extra)."""
    import edgec

    try:
        from edgec.runtime.server import serve as run_server
    except ImportError as exc:
        raise InputError(f"edgec serve needs the server extra: pip install 'edgec[server]' ({exc.name} is missing)") from None
    with edgec.load(bundle, threads=threads) as llm:
        if not hasattr(llm, "generate"):
            raise InputError(f"{bundle} is not a decoder bundle: edgec serve needs one (compile a GGUF or an `edgec import` folder)")
        name = name or bundle.resolve().name.removesuffix(".zip").removesuffix(".edgec")
        if policy is not None:
            llm = edgec.HybridLLM(local=llm, policy=policy)
        err.print(f"serving [bold]{escape(name)}[/] (context {llm.context_length} tokens"
                  f"{', routed by ' + escape(str(policy)) if policy else ''}) at http://{host}:{port}/v1", soft_wrap=True)
        try:
            run_server({name: llm}, host=host, port=port, api_key=api_key, max_queue=max_queue,
                       max_tokens_limit=max_tokens_limit, max_request_bytes=max_request_bytes)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
            pass


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), help="The source .onnx to compare against (ORT, default settings).")
@click.option("--shape", multiple=True, metavar="NAME=D1,D2,...", help="Shapes of generated inputs for dynamic dims.")
@click.option("--input", "-i", "input_specs", multiple=True, metavar="NAME=FILE.npy | FILE.npz", help="Real inputs instead.")
@click.option("--repeats", default=30, show_default=True, help="Timed runs per side.")
@click.option("--threads", default=0, show_default=True, help="ORT intra-op threads for both sides (0: one per core).")
@click.option("--prompt-tokens", default=128, show_default=True, help="Decoder bundles: prompt length.")
@click.option("--gen-tokens", default=128, show_default=True, help="Decoder bundles: tokens to generate.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(bundle, baseline, shape, input_specs, repeats, threads, prompt_tokens, gen_tokens, as_json):
    """Latency p50/p90, load time and peak RSS of BUNDLE, and the ratio against --baseline.

    For a decoder bundle: prefill and decode tokens/s, time to first token and peak RSS (also
    stored on this device for routing decisions)."""
    import edgec
    from edgec.bundle import open_bundle
    from edgec.compiler import samples
    from edgec.runtime.bench import bench_bundle, bench_decoder

    opened = open_bundle(bundle)
    kind = opened.manifest.get("kind")
    opened.close()
    if kind == "decoder":
        r = bench_decoder(bundle, prompt_tokens, gen_tokens, repeats=min(repeats, 3), threads=threads)
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            out.print(f"{bundle}: prompt {r['prompt_tokens']} tokens, generated {r['generated_tokens']:.0f}, threads {threads or 'default'}")
            out.print(f"  prefill {r['prefill_tokens_per_second']:.1f} tok/s   decode {r['decode_tokens_per_second']:.1f} tok/s   "
                      f"time to first token {r['time_to_first_token_ms']:.0f} ms   load {r['load_ms']:.0f} ms   peak RSS {r['peak_rss_mb']:.0f} MB")
        return

    if baseline is not None and not baseline.is_file():
        raise InputError(f"--baseline {baseline}: no such file")
    with edgec.load(bundle) as model:
        feeds = _read_inputs(input_specs, model.inputs) or next(
            samples.generate(samples.with_shapes(model.inputs, _shapes(shape, "--shape")), 1)
        )
    r = bench_bundle(bundle, baseline, feeds, repeats=repeats, threads=threads)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    table = Table("", "p50 ms", "p90 ms", "load ms", "peak RSS MB", title=escape(f"{bundle}  inputs {r['inputs']}"), title_justify="left")
    for side in ("bundle", "baseline"):
        if side in r:
            s = r[side]
            table.add_row(side, f"{s['p50_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['load_ms']:.1f}", f"{s['peak_rss_mb']:.0f}")
    out.print(table)
    if "latency_ratio" in r:
        out.print(f"latency ratio bundle/baseline {r['latency_ratio']:.3f}   load ratio {r['load_ratio']:.3f}"
                  f"   (first load, filling the cache: {r['bundle']['first_load_ms']:.1f} ms)")


@main.command("import")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Folder to write (model.onnx, tokenizer.json, generation.json).")
@click.option("--weights", type=click.Choice(["float", "gguf-int4"]), default="float", show_default=True,
              help="float: dequantize to float32; gguf-int4: keep the GGUF's own 4/8-bit blocks exactly.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
def import_(model, output, weights, force):
    """Import a GGUF (llama architecture) as an ONNX decoder with its tokenizer and generation config."""
    from edgec.models.llama import import_gguf

    with err.status(f"importing {model.name}", spinner="dots"):
        import_gguf(model, output, weights=weights, force=force)
    config = json.loads((output / "generation.json").read_text())
    size = sum(p.stat().st_size for p in output.iterdir())
    out.print(f"[green]✓[/] {output}  {config.get('model') or model.stem}  {size / 1e6:.0f} MB  "
              f"context {config.get('context_length')}  weights {weights}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json):
    """Every known target, and whether it can run here."""
    from edgec.targets import TARGETS

    described = [t().describe() for t in TARGETS.values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    table = Table("target", "devices", "artifact", "runs here", "backend")
    for d in described:
        table.add_row(d["name"], d["devices"], d["artifact"], ("yes: " if d["runs_here"] else "no: ") + d["why"], d["backend"])
    out.print(table)
