"""Push prompts to a continual experiment on a runtime: `python push.py URL NAMESPACE NAME FILE.jsonl`
(records of prompt, answer, metadata; the token from $CLORA_RUNTIME_TOKEN). Prints what is queued."""

import json
import os
import sys
from pathlib import Path

import httpx

url, namespace, name, path = sys.argv[1:5]
samples = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
headers = {"Authorization": f"Bearer {os.environ['CLORA_RUNTIME_TOKEN']}"}
for start in range(0, len(samples), 100):  # modest requests
    rsp = httpx.post(
        f"{url}/v1/experiments/{namespace}/{name}/samples",
        json={"samples": samples[start : start + 100]},
        headers=headers,
    )
    rsp.raise_for_status()
    print(f"accepted {rsp.json()['accepted']}, queued {rsp.json()['queued']}")
