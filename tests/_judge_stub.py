"""A stub OpenAI-compatible chat server on 127.0.0.1 that follows instructions deterministically.

* pairwise rubrics ("Response A: ... Response B: ..."): answers the response with more kind
  words (ties: "A", a pure position bias), with top_logprobs 0.8 / 0.2 when asked;
* pointwise rubrics ("Response: ..."): "5" with a kind word, "1" with an unkind one, else "3";
* critique requests: names the unkind words of the response (or "No problems.");
* revision requests: the response with every unkind word replaced by "kind";
* anything else: a reply that contains one unkind word, to be revised.

``plan`` (a list of "ok", "slow", "malformed", "401", "429", "500", "drop", "unreadable") scripts the next
requests' failures; ``always`` {substring: failure} fails every request whose body holds it; ``seen`` records each request's body and Authorization header.
``style`` (a function of "A" or "B") rewrites the pairwise verdicts, e.g. ``lambda v: f"I prefer {v}."``;
``headers`` adds response headers to the 429/500 failures (Retry-After "0" by default); ``error_body`` replaces
the body of the 429/500/401 failures.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KIND = {"kind", "lovely", "good", "wonderful", "generous", "warm", "happy"}
UNKIND = {"awful", "cruel", "mean", "horrible", "cold", "hates", "stupid"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def kindness(text: str) -> int:
    w = words(text)
    return sum(x in KIND for x in w) - sum(x in UNKIND for x in w)


def answer(content: str) -> str:
    if "Revision request:" in content:
        response = content.split("Assistant:", 1)[1].split("Critique request:", 1)[0].strip()
        return " ".join("kind" if w.strip(".,!").lower() in UNKIND else w for w in response.split())
    if "Critique request:" in content:
        response = content.split("Assistant:", 1)[1].split("Critique request:", 1)[0]
        bad = [w for w in words(response) if w in UNKIND]
        return ("The response uses unkind words: " + ", ".join(bad) + ".") if bad else "No problems."
    if "Response A:" in content:
        a = content.split("Response A:", 1)[1].split("Response B:", 1)[0]
        b = content.split("Response B:", 1)[1].split("\n\n", 1)[0]
        verdict = "A" if kindness(a) >= kindness(b) else "B"
        if "Think step by step" in content:
            return f"Response A scores {kindness(a)}, response B scores {kindness(b)}.\nAnswer: {verdict}"
        return verdict
    if "Response:" in content:
        k = kindness(content.split("Response:", 1)[1])
        return "5" if k > 0 else "1" if k < 0 else "3"
    return "That is an awful question, but here is my answer."


class StubServer:
    def __init__(self, slow_seconds: float = 1.0, delay: float = 0.0):
        self.plan: list[str] = []
        self.always: dict[str, str] = {}  # a request whose text holds the key always gets that failure
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.slow_seconds, self.delay = slow_seconds, delay
        self.style = None
        self.headers = {"Retry-After": "0"}
        self.error_body = b'{"error": "try later"}'
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    text = json.dumps(body)
                    marked = [v for k, v in stub.always.items() if k in text]
                    step = marked[0] if marked else stub.plan.pop(0) if stub.plan else "ok"
                    stub.seen.append({"body": body, "auth": self.headers.get("Authorization"), "step": step})
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self.respond(step, body)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def respond(self, step, body):
                time.sleep(stub.delay)
                if step == "drop":  # close the connection without a response
                    self.close_connection = True
                    return
                if step == "slow":
                    time.sleep(stub.slow_seconds)
                if step == "401":
                    self.send(401, stub.error_body if stub.error_body != b'{"error": "try later"}'
                              else b'{"error": "invalid api key"}')
                    return
                if step in ("429", "500"):
                    self.send(int(step), stub.error_body, stub.headers)
                    return
                if step == "malformed":
                    self.send(200, b'{"choices": [{"message": {"content": "A"')
                    return
                content = body["messages"][-1]["content"]
                text = "I think so." if step == "unreadable" else answer(content)
                if stub.style is not None and step != "unreadable" and "Response A:" in content \
                        and "Think step by step" not in content:
                    text = stub.style(text)
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if body.get("logprobs") and text in ("A", "B"):
                    other = "B" if text == "A" else "A"
                    choice["logprobs"] = {"content": [{"token": text, "logprob": math.log(0.8), "top_logprobs": [
                        {"token": text, "logprob": math.log(0.8)}, {"token": other, "logprob": math.log(0.2)}]}]}
                usage = {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split()),
                         "total_tokens": len(content.split()) + len(text.split())}
                self.send(200, json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                           "choices": [choice], "usage": usage}).encode())

            def send(self, code, payload, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
