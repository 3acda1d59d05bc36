"""One process of a multi-process pre-training run on localhost (tests/test_multiprocess.py starts them).

  python tests/_multiprocess_driver.py CONFIG.pkl WORKDIR PORT NUM_PROCESSES PROCESS_ID

The caller sets XLA_FLAGS (the number of CPU devices of this process). The config is a pickled ConfigDict, so
this process runs exactly the config the test built. The last stdout line is `RESULT {json}`: this process's
index, its device counts, its pid, the metrics the loop returned and the step it ended at.
"""
import json
import os
import pickle
import sys


def main(config_path, workdir, port, num_processes, process_id):
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                             process_id=int(process_id), initialization_timeout=60)
  from beit_jax.train import pretrain  # pylint: disable=import-outside-toplevel
  with open(config_path, "rb") as f:
    config = pickle.load(f)
  out = pretrain.train_and_evaluate(config, workdir)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "pid": os.getpid(), "metrics": out["metrics"], "step": int(jax.device_get(out["state"]["step"]))}
  jax.distributed.shutdown()
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
