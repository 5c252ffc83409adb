from megatron_softgrpo.cli import main

raise SystemExit(main())
