from mmpeft.cli import main

raise SystemExit(main())
