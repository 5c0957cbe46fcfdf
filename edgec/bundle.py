"""The bundle: ``NAME.edgec/`` with ``manifest.json``, the artifact and reports; optionally one zip file.

Writing is atomic: everything goes into a temporary sibling folder that is renamed into place
only when complete, so a failed compile leaves nothing behind and ``--force`` never leaves a
half-replaced bundle. Opening checks every file against the sha256 in the manifest; a zip is
unpacked only after each entry is checked not to escape its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgec.errors import BundleError, OutputExistsError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: Refuse zips that would unpack to more than this (zip bombs).
MAX_UNPACKED_BYTES = 64 << 30


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """An opened, hash-checked bundle. ``path`` is its folder (a temporary one for zip bundles)."""

    path: Path
    manifest: dict
    source: Path  #: what the user named: the folder or the .zip
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def file_sha256(self, name: str) -> str:
        return self.manifest["files"][name]["sha256"]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class BundleWriter:
    """Stage a bundle in a temporary folder next to ``output``; ``commit()`` moves it into place."""

    def __init__(self, output: str | os.PathLike, force: bool = False, as_zip: bool | None = None) -> None:
        self.output = Path(output)
        self.as_zip = self.output.suffix == ".zip" if as_zip is None else as_zip
        if self.output.exists() and not force:
            raise OutputExistsError(f"{self.output} exists; pass --force to overwrite it")
        parent = self.output.resolve().parent
        if not parent.is_dir():
            raise BundleError(f"cannot write {self.output}: folder {parent} does not exist")
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", suffix=".tmp", dir=parent))
        self.dir.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary folder

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir.exists():  # never committed: leave nothing behind
            shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: dict) -> Path:
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        staged = self.dir
        if self.as_zip:
            staged = self.dir.with_suffix(".zip")
            with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in sorted(self.dir.rglob("*")):
                    if p.is_file():
                        zf.write(p, p.relative_to(self.dir).as_posix())
            shutil.rmtree(self.dir)
        _replace(staged, self.output)
        return self.output


def _replace(staged: Path, output: Path) -> None:
    """Move ``staged`` to ``output``; an existing output is moved aside first and removed last."""
    old = None
    if output.exists() or output.is_symlink():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    try:
        os.replace(staged, output)
    except OSError:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle folder or zip and check every file's hash against the manifest."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle")
    if path.is_dir():
        bundle = Bundle(path=path, manifest=_read_manifest(path / MANIFEST, path), source=path)
    elif zipfile.is_zipfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="edgec-")
        try:
            _safe_unzip(path, Path(tmp.name))
            manifest = _read_manifest(Path(tmp.name) / MANIFEST, path)
        except BaseException:
            tmp.cleanup()
            raise
        bundle = Bundle(path=Path(tmp.name), manifest=manifest, source=path, _tmp=tmp)
    else:
        raise BundleError(f"{path}: not a bundle (expected a NAME.edgec folder or a .zip of one)")
    try:
        _check_files(bundle)
    except BaseException:
        bundle.close()
        raise
    return bundle


def _read_manifest(file: Path, where: Path) -> dict:
    if not file.is_file():
        raise BundleError(f"{where}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "artifact" not in manifest:
        raise BundleError(f"{where}: {MANIFEST} lacks the 'files' and 'artifact' entries")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: bundle schema version {version!r}; this edgec reads version {SCHEMA_VERSION}")
    return manifest


def _check_files(bundle: Bundle) -> None:
    root = bundle.path.resolve()
    listed = bundle.manifest["files"]
    for name, entry in listed.items():
        file = (root / name).resolve()
        if root not in file.parents:
            raise BundleError(f"{bundle.source}: manifest entry {name!r} points outside the bundle")
        if not file.is_file():
            raise BundleError(f"{bundle.source}: file {name} listed in the manifest is missing")
        if sha256_file(file) != entry.get("sha256"):
            raise BundleError(
                f"{bundle.source}: {name} was changed after compiling (sha256 mismatch); recompile the bundle"
            )
    unlisted = [
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
        and p.relative_to(root).as_posix() not in listed
    ]
    if unlisted:
        raise BundleError(f"{bundle.source}: {unlisted[0]} is not listed in the manifest (added after compiling)")
    if bundle.manifest["artifact"] not in listed:
        raise BundleError(f"{bundle.source}: the artifact {bundle.manifest['artifact']} is not listed in the manifest")


def _safe_unzip(path: Path, dest: Path) -> None:
    """Unpack ``path`` into ``dest``, refusing absolute paths, '..', links, and oversize content."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                name = PurePosixPath(info.filename)
                if info.filename.startswith(("/", "\\")) or ".." in name.parts or ":" in info.filename or "\\" in info.filename:
                    raise BundleError(f"{path}: zip entry {info.filename!r} escapes the bundle folder; refusing to open")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise BundleError(f"{path}: zip entry {info.filename!r} is a symbolic link; refusing to open")
                total += info.file_size
            if total > MAX_UNPACKED_BYTES:
                raise BundleError(f"{path}: zip would unpack to {total:,} bytes (limit {MAX_UNPACKED_BYTES:,})")
            for info in infos:
                if not info.is_dir():
                    target = dest / info.filename
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BundleError(f"{path}: damaged zip bundle ({exc})") from None
