"""The ``orsgen`` command line: every command is registered here, and only here.

    orsgen run CONFIG --out DIR [--set key=value ...] [-- <Beam flags>]
    orsgen demo --out DIR [--seed N] [-- <Beam flags>]
    orsgen preview | publish | export | eval | review ...

Everything after ``--`` goes to Beam's ``PipelineOptions`` untouched, so
``-- --runner=DataflowRunner --project=... --region=... --temp_location=gs://...``
runs the same graph on Dataflow. Without ``--runner`` the Python direct runner
(``FnApiRunner``, the runner Beam's ``DirectRunner`` ends up using) is named
explicitly, which skips DirectRunner's attempt to download the Prism binary.

The command functions live in ``commands_build`` (run, demo) and
``commands_dataset`` (preview, publish, export, eval); neither imports this
module, so there is no import cycle.
"""

from __future__ import annotations

import typer

from orsgen.pipelines import commands_build, commands_dataset

app = typer.Typer(
    name="orsgen",
    help="Build open-world referring-segmentation datasets with Apache Beam.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Build a dataset.
app.command(name="run")(commands_build.run)
app.command(name="demo")(commands_build.demo)
# Tools on a finished dataset.
app.command(name="preview")(commands_dataset.preview)
app.command(name="publish")(commands_dataset.publish)
app.command(name="export")(commands_dataset.export)
app.command(name="eval")(commands_dataset.eval_)
app.command(name="review")(commands_dataset.review)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
