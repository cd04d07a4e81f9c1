from lbtcp.cli import main

main()
