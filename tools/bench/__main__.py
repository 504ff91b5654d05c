import sys

from tools.bench.bench import main

if __name__ == "__main__":
    main()
    sys.exit(0)
