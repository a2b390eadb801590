"""Pinned npm packages as data: fetched with the ordinary npm client, checked by SHA-256.

    roots = fetch({"emoji-datasource-google": ("16.0.0", "<sha256>")}, "~/.cache/avg-jax")
    roots["emoji-datasource-google"]  # <download_dir>/emoji-datasource-google-16.0.0/package

`npm pack name@version` downloads the package tarball from the registry (npm's own cache,
proxy and registry settings apply); its SHA-256 must equal the pinned one, or nothing is
unpacked. The tarball is unpacked into a temporary folder beside the target and renamed into
place, so a folder that exists is complete; a `.sha256` file in it records which tarball it
came from. A folder already there from the same tarball is used as is (no network): copy the
folders, or the `.tgz` files, into `download_dir` to prepare on a machine without a registry.
"""

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile

from avg_jax.errors import UserError

MARKER = ".sha256"
_NPM_TIMEOUT_S = 600


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def tarball_name(name: str, version: str) -> str:
  """The file `npm pack name@version` writes (scoped names lose '@' and '/' -> '-')."""
  return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def _npm_pack(name: str, version: str, into: str) -> str:
  """Runs `npm pack name@version` in `into`; -> the tarball's path."""
  npm = shutil.which("npm")
  if npm is None:
    raise UserError(
      f"npm not found: it fetches the pinned package {name}@{version} (install "
      f"Node.js with npm, or copy {tarball_name(name, version)} into "
      f"data.download_dir)"
    )
  try:
    done = subprocess.run(
      [npm, "pack", f"{name}@{version}", "--silent"],
      cwd=into,
      capture_output=True,
      text=True,
      timeout=_NPM_TIMEOUT_S,
      check=False,
    )
  except subprocess.TimeoutExpired as e:
    raise UserError(
      f"npm pack {name}@{version} did not finish in {_NPM_TIMEOUT_S} s (no registry access?)"
    ) from e
  path = os.path.join(into, tarball_name(name, version))
  if done.returncode != 0 or not os.path.isfile(path):
    lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    why = lines[-1].strip() if lines else f"exit status {done.returncode}"
    raise UserError(f"npm pack {name}@{version} failed: {why}")
  return path


def _safe_members(archive: tarfile.TarFile, source: str):
  """The archive's regular files and folders; anything that would land outside the target
  folder (absolute paths, '..', links) is an error."""
  for member in archive.getmembers():
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
      raise UserError(f"{source}: unsafe entry {member.name!r} in the package tarball")
    yield member


def _unpack(tarball: str, target: str, sha256: str) -> None:
  """Unpacks `tarball` into `target` (atomically: a temp folder renamed into place)."""
  parent = os.path.dirname(os.path.abspath(target))
  tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
  try:
    try:
      with tarfile.open(tarball, "r:gz") as archive:
        archive.extractall(tmp, members=list(_safe_members(archive, tarball)))
    except (tarfile.TarError, OSError, EOFError) as e:
      raise UserError(f"{tarball}: cannot unpack ({type(e).__name__}: {e})") from e
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
      f.write(sha256 + "\n")
    os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def unpacked_sha256(folder: str) -> str:
  """The SHA-256 of the tarball `folder` was unpacked from ("" when unknown)."""
  try:
    with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return ""


def fetch(packages: dict[str, tuple[str, str]], download_dir: str) -> dict[str, str]:
  """`{name: (version, sha256)}` -> `{name: the unpacked package folder}` (module docstring).

  Raises `UserError` naming the package when npm is missing or fails, or when a tarball's
  SHA-256 differs from its pin (nothing is unpacked then).
  """
  root = os.path.abspath(os.path.expanduser(download_dir))
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise UserError(f"config data.download_dir: cannot create {root} ({e.strerror})") from e
  out = {}
  for name, (version, sha256) in packages.items():
    target = os.path.join(root, f"{name}-{version}")
    folder = os.path.join(target, "package")
    if unpacked_sha256(target) == sha256 and os.path.isdir(folder):
      out[name] = folder
      continue
    if os.path.exists(target):  # from another tarball, or damaged: fetch it again
      shutil.rmtree(target)
    tarball = os.path.join(root, tarball_name(name, version))
    if not (os.path.isfile(tarball) and _sha256(tarball) == sha256):
      with tempfile.TemporaryDirectory(dir=root) as tmp:
        fetched = _npm_pack(name, version, tmp)
        got = _sha256(fetched)
        if got != sha256:
          raise UserError(
            f"npm package {name}@{version}: SHA-256 {got} differs from the "
            f"pinned {sha256} (a changed or tampered package); nothing unpacked"
          )
        os.replace(fetched, tarball)
    _unpack(tarball, target, sha256)
    if not os.path.isdir(folder):
      raise UserError(f"{tarball}: holds no package/ folder")
    out[name] = folder
  return out
