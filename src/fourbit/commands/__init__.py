"""The top floor: one module per `fourbit` command. Each parses its flags (fourbit.commands.flags),
validates them before anything slow happens, calls the library, and prints. Each module holds a
one-line `SUMMARY` and `run(argv) -> int`, and imports nothing heavy until `run`, so
`fourbit --help` stays fast. A new command is a new module here plus one line in fourbit/cli.py.
"""
