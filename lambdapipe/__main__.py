"""`python -m lambdapipe`: the CLI of the package on the path, which is how the workflow's rules
call it (the `lambdapipe` script runs whichever checkout the environment installed)."""

from lambdapipe.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="lambdapipe")
