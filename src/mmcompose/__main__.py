from mmcompose.cli import main

main()
