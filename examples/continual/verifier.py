"""An HTTP verifier for task http (docs/verifier.md): rewards 1 when the completion's last number is
the item's answer, else 0. Run: `python verifier.py` (port 8000; set VERIFIER_TOKEN to require it)."""

import json
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = os.environ.get("VERIFIER_TOKEN")


def reward(item: dict) -> float:
    numbers = re.findall(r"-?\d+", item["completion"])
    return 1.0 if numbers and numbers[-1] == item.get("answer", "").strip() else 0.0


class Verifier(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if TOKEN and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = json.dumps({"rewards": [reward(item) for item in body["items"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), Verifier).serve_forever()
