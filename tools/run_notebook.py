"""Execute a notebook's code cells in order, in one namespace, and save it with their outputs (no Jupyter needed).

  python tools/run_notebook.py tutorial.ipynb            # runs in the notebook's folder, rewrites the file
  python tools/run_notebook.py tutorial.ipynb --out x.ipynb

What a Jupyter kernel with the inline matplotlib backend would record: stdout and stderr as stream outputs (a
carriage return overwrites its line, as in Jupyter), every pyplot figure as an image/png display_data when
plt.show() is called or the cell ends, the value of a cell's last expression (a matplotlib Figure as a PNG, anything
else as text/plain), an error output if a cell raises (execution stops there, exit status 1). execution_count is set
1, 2, ... The time of every cell goes to the terminal, not into the notebook.
"""
import argparse
import ast
import base64
import contextlib
import io
import json
import os
import sys
import time
import traceback


class Outputs(io.TextIOBase):
    """A text stream (stdout or stderr) that appends to the cell's outputs in the order things happen."""

    def __init__(self, outputs, name):
        self.outputs, self.name = outputs, name

    def write(self, text):
        last = self.outputs[-1] if self.outputs else None
        if last is not None and last.get("name") == self.name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


def png(fig, dpi):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": repr(fig)}}


def flush_figures(outputs, dpi):
    import matplotlib.pyplot as plt
    for num in plt.get_fignums():
        outputs.append(png(plt.figure(num), dpi))
    plt.close("all")


def clean_stream(text):
    """What Jupyter shows: on each line, only the text after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def run_cell(source, ns, outputs, dpi):
    """exec every statement but the last; eval the last if it is an expression (its value is the cell's result)."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), ns)
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns) if last is not None else None
    from matplotlib.figure import Figure
    if isinstance(value, Figure):
        outputs.append(png(value, dpi))
    elif value is not None:
        return {"output_type": "execute_result", "metadata": {}, "data": {"text/plain": repr(value)}}
    return None


def execute(nb, dpi):
    """Run the code cells of nb (a dict) in place; returns True if every cell ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns, count, t_start = {"__name__": "__main__"}, 0, time.time()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        outputs, t0, ok = [], time.time(), True
        plt.show = lambda *a, **k: flush_figures(outputs, dpi)
        try:
            with contextlib.redirect_stdout(Outputs(outputs, "stdout")), \
                    contextlib.redirect_stderr(Outputs(outputs, "stderr")):
                result = run_cell("".join(cell["source"]), ns, outputs, dpi)
                flush_figures(outputs, dpi)
            if result is not None:
                result["execution_count"] = count
                outputs.append(result)
        except Exception as e:                                  # record the error as Jupyter does, then stop
            ok, tb = False, traceback.format_exception(type(e), e, e.__traceback__)
            outputs.append({"output_type": "error", "ename": type(e).__name__, "evalue": str(e), "traceback": tb})
        for o in outputs:
            if o["output_type"] == "stream":
                o["text"] = clean_stream(o["text"])
        cell.update(execution_count=count, outputs=outputs)
        print(f"cell {count}: {time.time() - t0:.1f} s", file=sys.__stderr__, flush=True)
        if not ok:
            print("".join(tb), file=sys.__stderr__)
            return False
    print(f"all {count} code cells: {time.time() - t_start:.1f} s", file=sys.__stderr__)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook", help="the .ipynb file to execute")
    p.add_argument("--out", default="", help="where to save the executed notebook (default: overwrite the input)")
    p.add_argument("--dpi", type=int, default=72, help="resolution of the embedded figures (default 72)")
    args = p.parse_args(argv)
    path, out = os.path.abspath(args.notebook), os.path.abspath(args.out or args.notebook)
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    os.chdir(os.path.dirname(path))                            # a kernel starts in the notebook's folder
    sys.path.insert(0, os.path.dirname(path))
    ok = execute(nb, args.dpi)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
