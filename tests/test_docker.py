"""docker/Dockerfile parses (instruction by instruction) and pins every version it installs."""
import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"
INSTRUCTIONS = {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "ADD", "CMD", "ENTRYPOINT", "ARG", "LABEL", "EXPOSE",
                "USER", "SHELL", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def instructions():
    """Logical lines (continuations joined, comments dropped) as (INSTRUCTION, arguments)."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, args = current.strip().partition(" ")
            out.append((word, args.strip()))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses():
    parsed = instructions()
    assert parsed[0][0] == "FROM"
    for word, args in parsed:
        assert word in INSTRUCTIONS, f"unknown instruction {word!r}"
        assert args, f"{word} without arguments"


def test_base_image_and_python_packages_are_pinned():
    parsed = instructions()
    base = parsed[0][1]
    assert re.search(r":\d+\.\d+\.\d+", base), f"base image {base!r} has no exact version tag"
    pip_lines = [args for word, args in parsed if word == "RUN" and "pip install" in args]
    assert pip_lines
    packages = []
    for args in pip_lines:
        for cmd in args.split("&&"):
            if "pip install" not in cmd:
                continue
            tokens = cmd.split("pip install", 1)[1].split()
            skip_next = False
            for tok in tokens:
                if skip_next:
                    skip_next = False
                    continue
                if tok in ("--index-url", "--extra-index-url", "-r"):
                    skip_next = True
                    continue
                if tok.startswith("-") or tok == ".":
                    continue
                packages.append(tok)
    for required in ("torch", "deepspeed", "transformers", "mpi4py", "hydra-core", "zarr", "xxhash"):
        assert any(p.split("==")[0] == required for p in packages), f"{required} not installed in the image"
    unpinned = [p for p in packages if "==" not in p]
    assert not unpinned, f"unpinned packages: {unpinned}"
    assert any("openmpi" in args for word, args in parsed if word == "RUN"), "no MPI in the image"


def test_pinned_versions_lie_within_the_package_bounds():
    """The image installs the package with --no-deps: its pins must satisfy pyproject.toml's bounds themselves."""
    import pytest
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    bounds = {Requirement(r).name: Requirement(r).specifier
              for r in tomllib.loads((DOCKERFILE.parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]}
    text = " ".join(args for word, args in instructions() if word == "RUN")
    pins = dict(m.groups() for m in re.finditer(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+]+)", text))
    for name in ("torch", "deepspeed", "transformers"):
        assert pins[name] in bounds[name], f"Dockerfile pins {name}=={pins[name]}, pyproject asks {bounds[name]}"
