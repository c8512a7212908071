"""``python -m epcomm``: the self-checking dispatch/combine round trip (``epcomm.roundtrip``);
``python -m epcomm soak``: random calls against the reference backend (``epcomm.soak``)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["soak"]:
        from epcomm.soak import main
    else:
        from epcomm.roundtrip import main
    main()
