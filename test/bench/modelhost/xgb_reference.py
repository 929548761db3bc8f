#!/usr/bin/python3
"""Time XGBoost's own prediction for the model-host benchmark (BenchmarkXGBoostVsReference).

usage: xgb_reference.py MODEL_JSON ROWS_F32LE N_ROWS N_FEATURES REPEATS
Rows are little-endian float32, NaN for missing. Prints one JSON line:
{"xgboost_version": ..., "ns_per_row": ..., "method": ..., "checksum": ...}
Each call predicts all rows; the fastest call of REPEATS is kept (the Go side keeps its
fastest call too: a robust estimator on a shared machine). The faster of inplace_predict
and DMatrix+predict is reported, with nthread=1 to compare per core with the Go
evaluator (single-threaded per call).
"""
import json
import sys
import time

import numpy as np
import xgboost as xgb


def main():
    model, rows, n, f, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    x = np.fromfile(rows, dtype="<f4").reshape(n, f)
    bst = xgb.Booster(model_file=model)
    bst.set_param({"nthread": 1})
    best = None
    for method in ("inplace_predict", "dmatrix_predict"):
        def run():
            if method == "inplace_predict":
                return bst.inplace_predict(x, missing=np.nan)
            return bst.predict(xgb.DMatrix(x, missing=np.nan, nthread=1))
        out = run()  # warm up
        fastest = None
        for _ in range(reps):
            start = time.perf_counter_ns()
            out = run()
            took = time.perf_counter_ns() - start
            fastest = took if fastest is None else min(fastest, took)
        ns = fastest / n
        if best is None or ns < best[0]:
            best = (ns, method, float(np.sum(out, dtype=np.float64)))
    print(json.dumps({"xgboost_version": xgb.__version__, "ns_per_row": best[0], "method": best[1], "checksum": best[2]}))


if __name__ == "__main__":
    main()
