"""Run by the bench environment's Python (llama-cpp-python): TTFT and time per output token on a GGUF file.

usage: llamacpp_runner.py MODEL.gguf '[prompt ids]' MAX_TOKENS THREADS  -> one JSON line on stdout
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama


def main() -> None:
    path, ids, max_tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_batch=512, verbose=False, seed=0)
    eos = llm.token_eos()
    no_eos = {eos: -1e9}

    def run() -> tuple[float, float, int]:
        llm.reset()
        started = time.perf_counter()
        first = last = None
        tokens = 0
        for _ in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stream=True,
                                       logit_bias=no_eos):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
        return first - started, (last - first) / max(1, tokens - 1), tokens

    run()  # warm-up
    runs = [run() for _ in range(2)]
    print(json.dumps({"ttft_s": statistics.median(r[0] for r in runs),
                      "tpot_s": statistics.median(r[1] for r in runs),
                      "tokens": runs[-1][2]}))


if __name__ == "__main__":
    main()
