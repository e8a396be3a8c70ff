"""Build hook: generate the gRPC Python code from protos/ (never edited by hand, never committed).

``--proto_path=protos`` makes the generated imports package-absolute
(``from expertmesh.v1 import expertmesh_pb2``). The code is written into the source tree,
so editable installs see it, and then packaged by the normal build_py step.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def generate_protos() -> None:
    """Run grpc_tools.protoc over every .proto under protos/."""
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    include = Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTOS.rglob("*.proto")):
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--proto_path={include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    """build_py that generates the protobuf modules first."""

    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
