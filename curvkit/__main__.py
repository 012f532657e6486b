from curvkit.app.cli import main

raise SystemExit(main())
