"""The GPTQModel worker: quantizes one model to GPTQ or AWQ as its spec file says, in a process of its own
(`python finetune/export/gptq_worker.py SPEC.json`, started by gptq.py): importing gptqmodel patches
transformers and safetensors, so it never happens in the stage's own process."""
import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD

    if spec["method"] == "awq":  # the torch packer: the default CUDA one refuses a CPU, and needs a kernel build
        config = QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM, bits=spec["bits"],
                                group_size=spec["group_size"], pack_impl="original", offload_to_disk=False)
        backend = BACKEND.AWQ_TORCH
    else:
        config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"],
                                pack_impl="original", offload_to_disk=False)
        backend = BACKEND.AUTO
    model = GPTQModel.load(spec["merged"], config, device="cpu" if not torch.cuda.is_available() else "cuda:0")
    model.quantize([{"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])}
                    for row in spec["calibration"]], batch_size=1, backend=backend)
    model.save(spec["out"])
    Path(spec["out"], "quant_log.csv").unlink(missing_ok=True)  # timings of this run: not part of the model


if __name__ == "__main__":
    main(sys.argv[1])
