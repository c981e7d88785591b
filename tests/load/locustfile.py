"""Load test of the OpenAI-compatible HTTP API with locust (an independent client): LOAD_REQUESTS requests in all
(default 200), each user sending one at a time, alternating streamed chat completions and whole completions.
Time to first token and end-to-end time of the streamed ones are reported as their own entries ("TTFT",
"stream end-to-end").

    make run                                   # in one terminal
    make load                                  # in another: 16 users, 200 requests, against 127.0.0.1:8000
"""
from __future__ import annotations

import itertools
import json
import os
import time

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser

REQUESTS = int(os.environ.get("LOAD_REQUESTS", "200"))
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
TOPICS = ["the sea", "a lighthouse", "autumn rain", "a city at night", "an old library", "mountains", "a robot",
          "tea", "the moon", "a train journey", "北京的冬天", "coffee 🙂"]
issued = itertools.count()
finished = 0


class OpenAIUser(HttpUser):
    @task
    def one_request(self) -> None:
        global finished
        i = next(issued)
        if i >= REQUESTS:
            raise StopUser()
        topic = TOPICS[i % len(TOPICS)]
        common = {"model": "", "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i, "ignore_eos": True}
        if i % 2 == 0:
            self._streamed_chat({**common, "messages": [{"role": "user", "content": f"Write a poem about {topic}."}],
                                 "stream": True, "stream_options": {"include_usage": True}})
        else:
            self._completion({**common, "prompt": f"A short story about {topic}:"})
        finished += 1
        if finished >= REQUESTS:   # the last one: stop the run (from its own greenlet, not this user's)
            gevent.spawn(self.environment.runner.quit)

    def _completion(self, body: dict) -> None:
        with self.client.post("/v1/completions", json=body, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            usage = response.json().get("usage") or {}
            if usage.get("completion_tokens") != MAX_TOKENS:
                response.failure(f"usage {usage}")
            else:
                response.success()

    def _streamed_chat(self, body: dict) -> None:
        started = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="/v1/chat/completions (stream)") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            usage, error, done = None, None, False
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                elif event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter()
                usage = event.get("usage") or usage
            if error or not done or usage is None or usage["completion_tokens"] != MAX_TOKENS:
                response.failure(f"error {error}, [DONE] {done}, usage {usage}")
            else:
                response.success()
        if first is not None:   # the entry above times the headers; these time the tokens
            events.request.fire(request_type="SSE", name="TTFT", response_time=(first - started) * 1000,
                                response_length=0, exception=None, context={})
            events.request.fire(request_type="SSE", name="stream end-to-end",
                                response_time=(time.perf_counter() - started) * 1000, response_length=0,
                                exception=None, context={})
