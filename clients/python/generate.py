"""Regenerates baton_client/_pb from proto/baton/v1 with grpcio-tools.

    pip install ./clients/python[generate] && python clients/python/generate.py

The generated modules are committed so that `pip install ./clients/python` needs no
compiler; `generate.py --check` (run in CI) fails when they differ from the protos.
"""

import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = HERE.parent.parent / "proto"
OUT = HERE / "baton_client" / "_pb"
FILES = ["baton/v1/api.proto", "baton/v1/agent.proto", "baton/v1/admin.proto"]


def generate(into: pathlib.Path) -> None:
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={into}", f"--pyi_out={into}", f"--grpc_python_out={into}"]
    if protoc.main(args + FILES) != 0:
        sys.exit("protoc failed")
    # protoc writes absolute imports (`from baton.v1 import api_pb2`); inside the package
    # they must name it.
    for path in into.rglob("*.py*"):
        text = path.read_text()
        text = re.sub(r"^from baton\.v1 import", "from baton_client._pb.baton.v1 import", text, flags=re.M)
        path.write_text(text)
    for pkg in [into, into / "baton", into / "baton" / "v1"]:
        (pkg / "__init__.py").write_text('"""Generated from proto/baton/v1 by generate.py; do not edit."""\n')


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp) / "_pb"
        fresh.mkdir()
        generate(fresh)
        if "--check" in sys.argv:
            old = {p.relative_to(OUT): p.read_text() for p in OUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
            new = {p.relative_to(fresh): p.read_text() for p in fresh.rglob("*") if p.is_file()}
            if old != new:
                changed = sorted(str(p) for p in set(old) | set(new) if old.get(p) != new.get(p))
                sys.exit(f"baton_client/_pb differs from the protos ({', '.join(changed)}): run clients/python/generate.py")
            print("baton_client/_pb matches the protos")
            return
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
        print(f"generated {OUT}")


if __name__ == "__main__":
    main()
