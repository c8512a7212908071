"""``python -m epcomm``: the self-checking dispatch/combine round trip (see ``epcomm.roundtrip``)."""

from epcomm.roundtrip import main

if __name__ == "__main__":
    main()
