from sagaflow.cli import main

main()
