from orpo.cli import main

raise SystemExit(main())
