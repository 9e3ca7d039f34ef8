"""`python -m msclip_fast.info`: versions, CUDA, extension and per-op backend status."""
import json

from msclip_fast import info


def test_info_json_and_text(capsys):
    assert info.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for name in ("torch", "triton", "deepspeed", "open_clip", "DALI", "webdataset"):
        assert name in data["versions"]
    assert data["python"].count(".") == 2
    assert isinstance(data["cuda"]["available"], bool)
    if not data["cuda"]["available"]:
        assert data["cuda"]["reason"]
    ext = data["extension"]
    assert ext["importable"] or ext["reason"]
    # every op lists its backends; reference is always on
    assert {"attention", "modality_layer_norm", "bias_act", "contrastive_loss"} <= set(data["backends"])
    for backends in data["backends"].values():
        assert backends["reference"] == []
    text = info.format_report(data)
    assert "reference  on" in text and "extension msclip_fast._C" in text
