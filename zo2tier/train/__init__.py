"""Fine-tuning on labelled text: data (data.py), losses (objective.py), the job (job.py), HF Trainer.

Example::

    from zo2tier.train import finetune
    result = finetune(model="path/to/hf_dir", train="train.csv", test="test.csv", out="runs/out",
                      budget="device=2GiB,host=4GiB,disk=20GiB", disk_dir="runs/disk")
"""

from zo2tier.train.job import FineTuneConfig, FineTuneResult, finetune, run

__all__ = ["FineTuneConfig", "FineTuneResult", "finetune", "run"]
