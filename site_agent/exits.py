"""The ``flip-site`` command's exit statuses (its ``--help`` lists them)."""

from __future__ import annotations

from flip_core.exits import ExitCode


class SiteExit(ExitCode):
    """What ``flip-site``'s exit status says; a site's service manager or script may test for these."""

    OK = 0, "done (start: the agent stopped when asked)"
    PROBLEMS = 1, "a check found problems: doctor (task processes would be refused here), audit verify (an edit)"
    REFUSED = (
        2,
        (
            "the command line, the site's setup or its input is wrong, said in a sentence on stderr (a bad dataset, "
            "policy or certificate; not joined; no key pair)"
        ),
    )
    HUB_REFUSED = 3, "start: the hub's SuperLink kept refusing this site (its key is not registered there)"


__all__ = ["SiteExit"]
