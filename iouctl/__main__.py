from iouctl.cli import main

main()
