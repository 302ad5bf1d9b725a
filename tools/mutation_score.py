"""Mutation score of the test suite: how many one-line bugs in a model file's core method make the tests fail.

A development tool (not part of the references): it parses FILE, finds every single-line expression inside the
functions and classes named by --targets, makes one small change per mutant (an operator, a comparison, a constant,
a sign, two swapped elements, mean <-> sum, ...), writes the mutated FILE into a scratch copy of the repository, and
runs the test command there. A mutant is caught when the command fails (or times out), survives when it passes.

  python tools/mutation_score.py spikegan_minimal.py --targets gradient_penalty,Critic --tests test_minimal.py
  python tools/mutation_score.py ldns_minimal.py --targets S4D,DDPM --max 40 --list     # show the mutants only

Survivors are printed with their line, so each can be read: either a missing test, or an equivalent mutant (a
change that does not alter behaviour, e.g. a constant that is overwritten), which does not count against the suite.
"""
import argparse
import ast
import copy
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
          ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.MatMult: None}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
CALLS = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "amax": "amin", "amin": "amax", "cos": "sin",
         "sin": "cos", "exp": "log", "log": "exp", "argmax": "argmin", "argmin": "argmax", "maximum": "minimum",
         "minimum": "maximum", "cumsum": "cumprod", "sqrt": "square", "std": "var", "var": "std", "relu": "gelu",
         "gelu": "relu", "silu": "relu", "softplus": "relu", "transpose": "swapaxes", "flip": "clone",
         "tril": "triu", "triu": "tril", "floor": "ceil", "ceil": "floor", "ones": "zeros", "zeros": "ones",
         "ones_like": "zeros_like", "zeros_like": "ones_like", "randn": "rand", "rand": "randn", "abs": "neg"}


def targets_of(tree, names):
    """(first line, last line) of each function or class named in names ('f', 'Class' or 'Class.method')."""
    spans = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            spans[node.name] = (node.lineno, node.end_lineno)
            for sub in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(sub, ast.FunctionDef):
                    spans[f"{node.name}.{sub.name}"] = (sub.lineno, sub.end_lineno)
    missing = sorted(set(names) - set(spans))
    if missing:
        sys.exit(f"not found in the file: {missing}")
    return [spans[n] for n in names]


def variants(node):
    """Mutated copies of one expression node."""
    out = []
    if isinstance(node, ast.BinOp) and BINOPS.get(type(node.op)):
        out.append(ast.BinOp(node.left, BINOPS[type(node.op)](), node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.Div)):
        out.append(ast.BinOp(node.right, node.op, node.left))                  # operands swapped
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMPOPS:
        out.append(ast.Compare(node.left, [CMPOPS[type(node.ops[0])]()], node.comparators))
    if isinstance(node, ast.BoolOp):
        out.append(ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(node.operand)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
        v = node.value
        out.append(ast.Constant(v + 1 if isinstance(v, int) else (v * 2 if v else 1.0)))
        if v not in (0, 0.0):
            out.append(ast.Constant(0 if isinstance(v, int) else 0.0))
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append(ast.Constant(not node.value))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CALLS:
        m = copy.deepcopy(node)
        m.func.attr = CALLS[node.func.attr]
        out.append(m)
    if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) == 2 and isinstance(node.ctx, ast.Load) \
            and ast.dump(node.elts[0]) != ast.dump(node.elts[1]):
        out.append(type(node)([node.elts[1], node.elts[0]], ast.Load()))
    return out


def mutants(path, names):
    """Every mutant as (line number, original line, mutated line), one change each, deduplicated."""
    src = open(path, encoding="utf-8").read()
    lines = src.split("\n")
    tree = ast.parse(src)
    spans = targets_of(tree, set(names))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                  ast.Module)) and n.body and isinstance(n.body[0], ast.Expr)}
    seen, out = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr) or id(node) in docstrings or not hasattr(node, "lineno"):
            continue
        if node.lineno != node.end_lineno or not any(a <= node.lineno <= b for a, b in spans):
            continue
        raw = lines[node.lineno - 1].encode()
        seg = raw[node.col_offset:node.end_col_offset].decode()
        for m in variants(node):
            text = ast.unparse(m)
            if not isinstance(m, (ast.Constant, ast.Name, ast.Attribute, ast.Call)):
                text = f"({text})"
            new = (raw[:node.col_offset].decode() + text + raw[node.end_col_offset:].decode())
            key = (node.lineno, new)
            if new.strip() == lines[node.lineno - 1].strip() or key in seen:
                continue
            try:
                compile("\n".join(lines[:node.lineno - 1] + [new] + lines[node.lineno:]), path, "exec")
            except SyntaxError:
                continue
            seen.add(key)
            out.append((node.lineno, lines[node.lineno - 1], new))
    return sorted(out)


def run_tests(workdir, cmd, timeout):
    """Exit status of the test command in workdir, or "timeout" (the whole process group is then killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="the model file to mutate, e.g. ldns_minimal.py")
    p.add_argument("--targets", required=True, help="comma-separated functions / classes / Class.method to mutate")
    p.add_argument("--tests", default="test_minimal.py", help="pytest arguments (files, -k expressions)")
    p.add_argument("--max", type=int, default=0, help="sample at most this many mutants (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--timeout", type=float, default=300, help="seconds per test run; longer counts as caught")
    p.add_argument("--list", action="store_true", help="print the mutants and stop")
    p.add_argument("--report", default="", help="write every result to this JSON file")
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ms = mutants(os.path.join(root, a.file), [t.strip() for t in a.targets.split(",") if t.strip()])
    if a.max and len(ms) > a.max:
        ms = sorted(random.Random(a.seed).sample(ms, a.max))
    print(f"{len(ms)} mutants of {a.file}")
    if a.list:
        for ln, old, new in ms:
            print(f"  {ln}: {new.strip()}")
        return
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(a.tests)]
    work = tempfile.mkdtemp(prefix="mutation-")
    try:
        shutil.copytree(root, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", "*.pt"))
        t0 = time.time()
        if run_tests(work, cmd, a.timeout) != 0:
            sys.exit(f"the unmutated tests do not pass: {shlex.join(cmd)}")
        print(f"unmutated tests pass in {time.time() - t0:.0f} s: {shlex.join(cmd)}")
        original = open(os.path.join(root, a.file), encoding="utf-8").read().split("\n")
        results = []
        for i, (ln, old, new) in enumerate(ms, 1):
            with open(os.path.join(work, a.file), "w", encoding="utf-8") as f:
                f.write("\n".join(original[:ln - 1] + [new] + original[ln:]))
            rc = run_tests(work, cmd, a.timeout)
            verdict = "survived" if rc == 0 else "caught"
            results.append(dict(line=ln, original=old.strip(), mutant=new.strip(), verdict=verdict, rc=rc))
            print(f"[{i}/{len(ms)}] {verdict.upper():8} {a.file}:{ln}: {new.strip()}", flush=True)
        with open(os.path.join(work, a.file), "w", encoding="utf-8") as f:
            f.write("\n".join(original))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    caught = sum(r["verdict"] == "caught" for r in results)
    print(f"\ncaught {caught} / {len(results)} = {100 * caught / max(1, len(results)):.0f} %")
    for r in results:
        if r["verdict"] == "survived":
            print(f"  survived {a.file}:{r['line']}: {r['original']}  ->  {r['mutant']}")
    if a.report:
        with open(a.report, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
