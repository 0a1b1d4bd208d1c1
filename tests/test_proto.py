"""The checked-in generated code must be what `make proto` produces from receiver.proto."""
import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("receiver_pb2.py", "receiver_pb2.pyi", "receiver_pb2_grpc.py")


def test_generated_code_is_not_stale(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "receiver.proto", tmp_path / "proto" / "receiver.proto")
    code = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", str(tmp_path / "proto" / "receiver.proto")])
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_text()
        assert fresh == (ROOT / "proto" / name).read_text(), f"proto/{name} is stale: run `make proto`"
